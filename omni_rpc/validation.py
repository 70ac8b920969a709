"""Request validation shared by the coordinator (which rejects bad input before dispatch)
and the agents (which never trust the network). Errors name the offending field.

Media inputs (``GenerateRequest.inputs`` and chat ``ContentPart.media``) must have a mime type
of ``image/*``, ``audio/*`` or ``video/*`` and non-empty data; their modality is the mime
type's top-level type. Output modalities (``GenerateRequest.modalities``) are "text", "audio"
or "image". Which nodes take them is routing's business (``coordinator/dispatch.py``); an
agent refuses media its engine does not take (``check_modalities``), never ignores it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass, field

from omni_rpc import config
from omni_rpc.v1 import generate_pb2

# The modalities a media input may have (its mime type's top-level type), and those a request
# may ask for as output (GenerateRequest.modalities).
INPUT_MODALITIES = ("image", "audio", "video")
OUTPUT_MODALITIES = ("text", "audio", "image")
# A mime type goes into error messages and logs: no kilobyte ones.
MAX_MIME_TYPE_CHARS = 255


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


def modality(mime_type: str) -> str:
    """The modality of a media item: its mime type's top-level type, lower case."""
    return mime_type.partition("/")[0].strip().lower()


def validate_media(media: generate_pb2.Media, where: str) -> None:
    """A media input: an image/*, audio/* or video/* mime type, and data."""
    mime = media.mime_type
    if not mime:
        raise InvalidRequest(
            f"{where}.mime_type", "must not be empty (image/*, audio/* or video/*)"
        )
    if len(mime) > MAX_MIME_TYPE_CHARS:
        raise InvalidRequest(f"{where}.mime_type", f"at most {MAX_MIME_TYPE_CHARS} characters")
    kind, slash, subtype = mime.partition("/")
    if modality(kind) not in INPUT_MODALITIES or not slash or not subtype.strip():
        raise InvalidRequest(
            f"{where}.mime_type", f"must be image/*, audio/* or video/*, got {mime!r}"
        )
    if not media.data:
        raise InvalidRequest(f"{where}.data", "must not be empty")


def chat_media(
    messages: Sequence[generate_pb2.ChatMessage],
) -> list[generate_pb2.Media]:
    """The media parts of a chat, in order."""
    return [p.media for m in messages for p in m.parts if p.WhichOneof("part") == "media"]


def input_modalities(request: generate_pb2.GenerateRequest) -> frozenset[str]:
    """The modalities of a request's media (inputs and chat parts): "image", "audio", ..."""
    media = (*request.inputs, *chat_media(request.messages))
    return frozenset(modality(m.mime_type) for m in media)


def output_modalities(request: generate_pb2.GenerateRequest) -> frozenset[str]:
    """The media modalities a request asks for (GenerateRequest.modalities, less "text")."""
    return frozenset(m for m in request.modalities if m != "text")


def media_bytes(request: generate_pb2.GenerateRequest) -> int:
    """The size of a request's media data (inputs and chat parts), in bytes."""
    return sum(len(m.data) for m in (*request.inputs, *chat_media(request.messages)))


def modality_problem(
    inputs: Set[str], outputs: Set[str], takes: Iterable[str], produces: Iterable[str], model: str
) -> InvalidRequest | None:
    """Why a model that takes ``takes`` and produces ``produces`` (media modalities, besides
    text) cannot serve a request with media of ``inputs`` asking for ``outputs``; None if it
    can."""
    takes, produces = set(takes), set(produces)
    missing = sorted(set(inputs) - takes)
    if missing:
        return InvalidRequest(
            "inputs",
            f"model {model!r} does not take {missing[0]} input (it takes: "
            f"{', '.join(('text', *sorted(takes)))})",
        )
    missing = sorted(set(outputs) - produces)
    if missing:
        return InvalidRequest(
            "modalities",
            f"model {model!r} does not produce {missing[0]} output (it produces: "
            f"{', '.join(('text', *sorted(produces)))})",
        )
    return None


def check_modalities(
    request: generate_pb2.GenerateRequest,
    takes: Iterable[str],
    produces: Iterable[str],
    model: str,
) -> None:
    """InvalidRequest unless a model that takes ``takes`` and produces ``produces`` (besides
    text) can serve ``request``: media it would ignore is refused, never dropped."""
    problem = modality_problem(
        input_modalities(request), output_modalities(request), takes, produces, model
    )
    if problem is not None:
        raise problem


def validate_messages(messages: Sequence[generate_pb2.ChatMessage]) -> None:
    """A chat: every turn has a role and either text content or parts (text or media)."""
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
                validate_media(part.media, f"{where}.parts[{number}].media")


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
    for index, media in enumerate(request.inputs):
        validate_media(media, f"inputs[{index}]")
    for wanted in request.modalities:
        if wanted not in OUTPUT_MODALITIES:
            raise InvalidRequest(
                "modalities",
                f"must be {', '.join(map(repr, OUTPUT_MODALITIES))}, got {wanted!r}",
            )
    sampling = resolve_sampling(
        request.sampling, default_max_tokens=default_max_tokens, max_tokens_cap=max_tokens_cap
    )
    if request.HasField("resume"):
        validate_resume(request, sampling.max_tokens)
    return sampling


def validate_resume(request: generate_pb2.GenerateRequest, max_tokens: int) -> None:
    """A client's resume point must be one the stream could have reached: token ids >= 0,
    fewer than max_tokens (a stream that delivered all of them had finished), text only with
    the tokens it was decoded from, media items only for requests that asked for media."""
    resume = request.resume
    if any(t < 0 for t in resume.token_ids):
        raise InvalidRequest("resume.token_ids", "token ids must be >= 0")
    if resume.text and not resume.token_ids:
        raise InvalidRequest(
            "resume.text", "the text received comes with the token ids received: give both"
        )
    # With media outputs, every token may be out while media items are still to come.
    room = max_tokens if output_modalities(request) else max_tokens - 1
    if len(resume.token_ids) > room:
        raise InvalidRequest(
            "resume.token_ids",
            f"{len(resume.token_ids)} tokens received, max_tokens is {max_tokens}: nothing "
            "is left to generate (the message with the last token also ends the stream)",
        )
    if resume.media_items_delivered < 0:
        raise InvalidRequest(
            "resume.media_items_delivered", f"must be >= 0, got {resume.media_items_delivered}"
        )
    if resume.media_items_delivered and not output_modalities(request):
        raise InvalidRequest(
            "resume.media_items_delivered",
            "the request asks for no media output (modalities)",
        )
