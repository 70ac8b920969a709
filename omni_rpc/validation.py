"""Request validation shared by the coordinator (which rejects bad input before dispatch)
and the agents (which never trust the network). Errors name the offending field."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from omni_rpc import config
from omni_rpc.v1 import generate_pb2


class InvalidRequest(ValueError):
    """A request that can never succeed: maps to INVALID_ARGUMENT, never retried."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name


@dataclass(frozen=True)
class Sampling:
    """SamplingParams with defaults applied and every value checked."""

    max_tokens: int = config.DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False


def resolve_sampling(
    params: generate_pb2.SamplingParams,
    *,
    default_max_tokens: int = config.DEFAULT_MAX_TOKENS,
    max_tokens_cap: int = config.MAX_TOKENS_CAP,
) -> Sampling:
    max_tokens = params.max_tokens if params.HasField("max_tokens") else default_max_tokens
    if max_tokens <= 0:
        raise InvalidRequest("sampling.max_tokens", f"must be > 0, got {max_tokens}")
    if max_tokens > max_tokens_cap:
        raise InvalidRequest(
            "sampling.max_tokens", f"must be <= {max_tokens_cap} (the server cap), got {max_tokens}"
        )
    temperature = params.temperature if params.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest("sampling.temperature", f"must be finite and >= 0, got {temperature}")
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0):  # NaN fails this too
        raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {top_p}")
    top_k = params.top_k if params.HasField("top_k") else -1
    if top_k < -1:
        raise InvalidRequest("sampling.top_k", f"must be -1 (disabled), 0 or positive, got {top_k}")
    if any(s == "" for s in params.stop):
        raise InvalidRequest("sampling.stop", "stop strings must not be empty")
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        ignore_eos=params.ignore_eos,
    )


def validate_messages(messages: Sequence[generate_pb2.ChatMessage]) -> None:
    """A chat: every turn has a role and either text content or parts, and no media yet."""
    if len(messages) > config.MAX_CHAT_MESSAGES:
        raise InvalidRequest(
            "messages", f"at most {config.MAX_CHAT_MESSAGES} messages, got {len(messages)}"
        )
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not message.role:
            raise InvalidRequest(f"{where}.role", "must not be empty")
        if len(message.role) > config.MAX_CHAT_ROLE_CHARS:
            raise InvalidRequest(
                f"{where}.role", f"at most {config.MAX_CHAT_ROLE_CHARS} characters"
            )
        if message.content and message.parts:
            raise InvalidRequest(where, "give content or parts, not both")
        for number, part in enumerate(message.parts):
            kind = part.WhichOneof("part")
            if kind is None:
                raise InvalidRequest(f"{where}.parts[{number}]", "set text or media")
            if kind == "media":
                # Refused rather than dropped, as GenerateRequest.inputs.
                raise InvalidRequest(
                    f"{where}.parts[{number}].media",
                    "media inputs are not supported yet (text parts only)",
                )


def chat_text_bytes(messages: Sequence[generate_pb2.ChatMessage]) -> int:
    """The UTF-8 size of a chat's roles and text (what a prompt size limit counts)."""
    total = 0
    for message in messages:
        total += len(message.role.encode("utf-8", "surrogatepass"))
        total += len(message.content.encode("utf-8", "surrogatepass"))
        for part in message.parts:
            total += len(part.text.encode("utf-8", "surrogatepass"))
    return total


def validate_request(
    request: generate_pb2.GenerateRequest,
    *,
    default_max_tokens: int = config.DEFAULT_MAX_TOKENS,
    max_tokens_cap: int = config.MAX_TOKENS_CAP,
) -> Sampling:
    """Check a GenerateRequest; return its sampling settings with defaults applied."""
    if len(request.request_id) > config.MAX_REQUEST_ID_CHARS:
        # It goes into every log line about the request: no megabyte ids.
        raise InvalidRequest(
            "request_id",
            f"at most {config.MAX_REQUEST_ID_CHARS} characters, got {len(request.request_id)}",
        )
    given = [
        name
        for name, present in (
            ("prompt", bool(request.prompt)),
            ("prompt_token_ids", bool(request.prompt_token_ids)),
            ("messages", bool(request.messages)),
        )
        if present
    ]
    if not given:
        raise InvalidRequest(
            "prompt", "give a prompt, prompt_token_ids or messages (all three are empty)"
        )
    if len(given) > 1:
        raise InvalidRequest("prompt", f"give only one of {' and '.join(given)}")
    validate_messages(request.messages)
    if any(t < 0 for t in request.prompt_token_ids):
        raise InvalidRequest("prompt_token_ids", "token ids must be >= 0")
    if request.HasField("max_retries") and request.max_retries < 0:
        raise InvalidRequest("max_retries", f"must be >= 0, got {request.max_retries}")
    if request.HasField("stream_interval") and request.stream_interval < 1:
        raise InvalidRequest("stream_interval", f"must be >= 1, got {request.stream_interval}")
    if request.inputs:
        # Refused rather than dropped: a request must never be answered as if its images or
        # audio had been seen. Multimodal inputs are an upcoming capability.
        raise InvalidRequest(
            "inputs", "media inputs are not supported yet (text and token id prompts only)"
        )
    return resolve_sampling(
        request.sampling, default_max_tokens=default_max_tokens, max_tokens_cap=max_tokens_cap
    )
