"""Request validation shared by the coordinator (which rejects bad input before dispatch)
and the agents (which never trust the network). Errors name the offending field."""

from __future__ import annotations

import math
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
    if not request.prompt and not request.prompt_token_ids:
        raise InvalidRequest("prompt", "give a prompt or prompt_token_ids (both are empty)")
    if request.prompt and request.prompt_token_ids:
        raise InvalidRequest("prompt", "give either prompt or prompt_token_ids, not both")
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
