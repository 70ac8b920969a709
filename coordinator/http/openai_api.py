"""OpenAI's completions and chat completions JSON, translated to and from omni.v1 messages.

Pure functions, no I/O: ``completion_call`` and ``chat_call`` turn a decoded request body into
a ``Call`` (a ``GenerateRequest`` plus how to answer), ``Answer`` collects a non-streamed
answer, ``ChunkEncoder`` writes the SSE events of a streamed one, and ``error_for_status`` maps
every gRPC status to OpenAI's error shape and an HTTP status.

Nothing that would change the result is ever dropped: a parameter we do not implement is
accepted only at the value that changes nothing (OpenAI's default), any other value is a 400
naming it, and an unknown parameter is a 400 too (as OpenAI answers).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from omni_rpc.v1 import generate_pb2

# OpenAI's default for /v1/completions (its API reference); chat has none, so a chat without
# max_tokens gets the server's default (omni_rpc/config.py DEFAULT_MAX_TOKENS).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)

# gRPC status -> HTTP status: the mapping of google.rpc.Code (code.proto), which
# grpc-gateway and Google's HTTP APIs use.
HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

# HTTP status -> OpenAI's error "type".
ERROR_TYPE: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPE.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(param: str, problem: str) -> ApiError:
    """A 400 naming the parameter at fault."""
    return ApiError(400, f"{param}: {problem}", param=param, code="invalid_argument")


def error_for_status(code: grpc.StatusCode, message: str, field: str = "") -> ApiError:
    """The HTTP answer to a call that ended with gRPC status ``code``; ``field``: the
    GenerateRequest field validation named, given back as OpenAI's parameter name."""
    return ApiError(
        HTTP_STATUS.get(code, 500), message, openai_param(field) if field else None, code.name
    )


_PARTS = re.compile(r"^messages\[(\d+)\]\.parts\[(\d+)\]")


def openai_param(field_name: str) -> str:
    """A GenerateRequest field path as the OpenAI parameter it came from."""
    name = field_name.removeprefix("sampling.")
    if name == "prompt_token_ids":
        return "prompt"
    if name == "request_id":
        return "x-request-id"
    return _PARTS.sub(r"messages[\1].content[\2]", name)


# -- requests --------------------------------------------------------------------------------


@dataclass
class Call:
    """What an HTTP request asks: the GenerateRequest and how to answer it."""

    request: generate_pb2.GenerateRequest
    chat: bool
    stream: bool = False
    include_usage: bool = False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _zero(value: object) -> bool:
    return value is None or (_is_number(value) and value == 0)


def _one(value: object) -> bool:
    return value is None or (_is_number(value) and value == 1)


def _false(value: object) -> bool:
    return value is None or value is False


def _true(value: object) -> bool:
    return value is None or value is True


def _empty(value: object) -> bool:
    return value is None or value in ("", [], {})


def _no_tool_choice(value: object) -> bool:
    return value is None or value in ("none", "auto")


def _text_format(value: object) -> bool:
    return value is None or value == {"type": "text"}


def _anything(value: object) -> bool:
    return True


# Parameters we do not implement, with the values that change nothing (accepted); any other
# value is refused naming the parameter, never ignored.
NEUTRAL: Mapping[str, Callable[[object], bool]] = {
    "presence_penalty": _zero,
    "frequency_penalty": _zero,
    "logit_bias": _empty,
    "logprobs": _false,  # completions: an int (0 still asks for the sampled token's logprob)
    "top_logprobs": _zero,
    "echo": _false,
    "best_of": _one,
    "suffix": _empty,
    "tools": _empty,
    "functions": _empty,
    "tool_choice": _no_tool_choice,
    "function_call": _no_tool_choice,
    "parallel_tool_calls": _anything,  # only means something with tools, refused above
    "response_format": _text_format,
    "prediction": _empty,
    "reasoning_effort": _empty,
    "store": _false,
    # vLLM's extensions at their defaults.
    "repetition_penalty": _one,
    "min_p": _zero,
    "min_tokens": _zero,
    "include_stop_str_in_output": _false,
    "skip_special_tokens": _true,
    "add_generation_prompt": _true,
    "continue_final_message": _false,
}
# Accepted and ignored: they never change the result.
IGNORED = frozenset({"metadata", "service_tier"})
COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "ignore_eos",
        "n",
        # OpenAI's end-user id: the request's affinity_key (consistent_hash routes by it).
        "user",
    }
)
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "modalities", "audio"}
CHAT_ONLY_NEUTRAL = frozenset(
    {
        "top_logprobs",
        "tools",
        "functions",
        "tool_choice",
        "function_call",
        "parallel_tool_calls",
        "response_format",
        "prediction",
        "reasoning_effort",
        "store",
        "add_generation_prompt",
        "continue_final_message",
    }
)
COMPLETION_ONLY_NEUTRAL = frozenset({"echo", "best_of", "suffix"})


def _check_parameters(body: Mapping[str, Any], known: frozenset[str], chat: bool) -> None:
    """Refuse what we would otherwise have to ignore: unknown parameters, and those we do not
    implement at a value that changes the result."""
    not_here = COMPLETION_ONLY_NEUTRAL if chat else CHAT_ONLY_NEUTRAL
    for name, value in body.items():
        if name in known or name in IGNORED:
            continue
        neutral = NEUTRAL.get(name)
        if neutral is None or name in not_here:
            raise invalid(name, "unrecognized request argument")
        if not neutral(value):
            raise invalid(name, f"is not supported (only its default value), got {value!r}")


def _int(body: Mapping[str, Any], name: str, bounds: tuple[int, int] = INT32) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid(name, f"must be an integer, got {value!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise invalid(name, f"out of range, got {value}")
    return int(value)


def _float(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise invalid(name, f"must be a number, got {value!r}")
    return float(value)


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, f"must be true or false, got {value!r}")
    return value


def _stop(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise invalid("stop", f"must be a string or a list of strings, got {value!r}")


def _sampling(body: Mapping[str, Any], sampling: generate_pb2.SamplingParams) -> None:
    for name in ("temperature", "top_p"):
        number = _float(body, name)
        if number is not None:
            setattr(sampling, name, number)
    top_k = _int(body, "top_k")
    if top_k is not None:
        sampling.top_k = top_k
    seed = _int(body, "seed", INT64)
    if seed is not None:
        sampling.seed = seed
    sampling.stop.extend(_stop(body.get("stop")))
    sampling.ignore_eos = _bool(body, "ignore_eos")


def _max_tokens(body: Mapping[str, Any], chat: bool) -> int | None:
    """max_tokens, or chat's newer max_completion_tokens (the two must agree when both are
    given); None: the endpoint's default."""
    tokens = _int(body, "max_tokens")
    if not chat:
        return COMPLETIONS_DEFAULT_MAX_TOKENS if tokens is None else tokens
    completion = _int(body, "max_completion_tokens")
    if completion is not None and tokens is not None and completion != tokens:
        raise invalid(
            "max_completion_tokens",
            f"differs from max_tokens ({completion} != {tokens}): give one of them",
        )
    return completion if completion is not None else tokens


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise invalid("stream_options", "is only allowed when stream is true")
    if not isinstance(options, dict):
        raise invalid("stream_options", f"must be an object, got {options!r}")
    for key, value in options.items():
        if key == "include_usage":
            if not isinstance(value, bool):
                raise invalid("stream_options.include_usage", f"must be true or false: {value!r}")
        elif not _false(value):
            raise invalid(f"stream_options.{key}", "is not supported")
    return stream, bool(options.get("include_usage"))


def _base(body: object, chat: bool) -> tuple[Mapping[str, Any], Call]:
    """The checks and fields both endpoints share."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_argument")
    _check_parameters(body, CHAT_FIELDS if chat else COMPLETION_FIELDS, chat)
    n = _int(body, "n")
    if n not in (None, 1):
        raise invalid("n", f"only n=1 is supported (one choice per request), got {n}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", f"must be a string, got {model!r}")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", f"must be a string, got {user!r}")
    request = generate_pb2.GenerateRequest(model=model or "", affinity_key=user or "")
    _sampling(body, request.sampling)
    max_tokens = _max_tokens(body, chat)
    if max_tokens is not None:
        request.sampling.max_tokens = max_tokens
    stream, include_usage = _stream(body)
    return body, Call(request, chat, stream, include_usage)


def _token_ids(value: list[Any]) -> list[int]:
    if not all(_is_int(t) and INT32[0] <= t <= INT32[1] for t in value):
        raise invalid("prompt", "a token id list must hold 32-bit integers only")
    return value


def _prompt(value: object, request: generate_pb2.GenerateRequest) -> None:
    """A string, a list of token ids, or a batch of one of either."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str):
        request.prompt = value
        return
    if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
        raise invalid(
            "prompt",
            f"a list of {len(value)} prompts (a batch) is not supported: send one request "
            "per prompt",
        )
    if isinstance(value, list):
        request.prompt_token_ids.extend(_token_ids(value))
        return
    raise invalid("prompt", f"must be a string or a list of token ids, got {value!r}")


def completion_call(body: object) -> Call:
    """``POST /v1/completions``."""
    fields, call = _base(body, chat=False)
    if "prompt" not in fields:
        raise invalid("prompt", "is required")
    _prompt(fields["prompt"], call.request)
    return call


MEDIA_PARTS = frozenset(
    {"image_url", "input_audio", "audio_url", "video_url", "image", "audio", "video", "file"}
)
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL)
_AUDIO_FORMAT = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,31}$")


def _base64(where: str, text: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise invalid(where, "is not valid base64") from None
    if not data:
        raise invalid(where, "must not be empty")
    return data


def _fields(where: str, value: object, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise invalid(where, f"must be an object, got {value!r}")
    extra = sorted(set(value) - set(allowed))
    if extra:
        raise invalid(f"{where}.{extra[0]}", "is not supported")
    return value


def _image_url(where: str, part: Mapping[str, Any]) -> generate_pb2.Media:
    """An ``image_url`` part: a ``data:`` URL (base64), never a URL to fetch."""
    image = _fields(f"{where}.image_url", part.get("image_url"), ("url", "detail"))
    if image.get("detail", "auto") != "auto":
        raise invalid(f"{where}.image_url.detail", "only 'auto' is supported")
    url = image.get("url")
    if not isinstance(url, str):
        raise invalid(f"{where}.image_url.url", f"must be a string, got {url!r}")
    match = _DATA_URL.match(url)
    if match is None:
        raise invalid(
            f"{where}.image_url.url",
            "only data: URLs are supported (data:image/...;base64,...): the server never "
            "fetches a URL",
        )
    mime, params, payload = match.groups()
    if "base64" not in params.split(";"):
        raise invalid(f"{where}.image_url.url", "only base64 data: URLs are supported")
    if not mime.lower().startswith("image/"):
        raise invalid(f"{where}.image_url.url", f"must be an image/* data: URL, got {mime!r}")
    return generate_pb2.Media(mime_type=mime, data=_base64(f"{where}.image_url.url", payload))


def _input_audio(where: str, part: Mapping[str, Any]) -> generate_pb2.Media:
    """An ``input_audio`` part: base64 data and its format (wav: audio/wav, else audio/FORMAT)."""
    audio = _fields(f"{where}.input_audio", part.get("input_audio"), ("data", "format"))
    fmt = audio.get("format")
    if not isinstance(fmt, str) or not _AUDIO_FORMAT.match(fmt):
        raise invalid(
            f"{where}.input_audio.format", f"must be an audio format (wav, mp3), got {fmt!r}"
        )
    data = audio.get("data")
    if not isinstance(data, str):
        raise invalid(f"{where}.input_audio.data", f"must be a base64 string, got {data!r}")
    return generate_pb2.Media(
        mime_type=f"audio/{fmt}", data=_base64(f"{where}.input_audio.data", data)
    )


def _part(where: str, part: object) -> generate_pb2.ContentPart:
    if not isinstance(part, dict):
        raise invalid(where, f"a content part must be an object, got {part!r}")
    kind = part.get("type")
    if kind in ("image_url", "input_audio"):
        extra = sorted(set(part) - {"type", kind})
        if extra:
            raise invalid(f"{where}.{extra[0]}", "is not supported")
        media = _image_url(where, part) if kind == "image_url" else _input_audio(where, part)
        return generate_pb2.ContentPart(media=media)
    if kind in MEDIA_PARTS:
        raise invalid(
            where,
            f"{kind} parts are not supported (image_url with a data: URL and input_audio are)",
        )
    if kind != "text":
        raise invalid(where, f"unknown content part type {kind!r}")
    text = part.get("text")
    if not isinstance(text, str):
        raise invalid(f"{where}.text", f"must be a string, got {text!r}")
    extra = sorted(set(part) - {"type", "text"})
    if extra:
        raise invalid(f"{where}.{extra[0]}", "is not supported")
    return generate_pb2.ContentPart(text=text)


def _message(index: int, message: object) -> generate_pb2.ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(where, f"must be an object, got {message!r}")
    role = message.get("role")
    if not isinstance(role, str):
        raise invalid(f"{where}.role", f"must be a string, got {role!r}")
    for key, value in message.items():
        # A name, tool calls or a tool call id would change what the model is shown.
        if key not in ("role", "content") and not _empty(value):
            raise invalid(f"{where}.{key}", "is not supported")
    content = message.get("content")
    turn = generate_pb2.ChatMessage(role=role)
    if isinstance(content, str):
        turn.content = content
    elif isinstance(content, list):
        turn.parts.extend(_part(f"{where}.content[{i}]", p) for i, p in enumerate(content))
    elif content is not None:
        raise invalid(f"{where}.content", f"must be a string or a list of parts, got {content!r}")
    return turn


def chat_call(body: object) -> Call:
    """``POST /v1/chat/completions``."""
    fields, call = _base(body, chat=True)
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list of messages")
    call.request.messages.extend(_message(i, m) for i, m in enumerate(messages))
    call.request.modalities.extend(_modalities(fields))
    return call


# Output modalities the chat endpoint answers in OpenAI's shape. "image" is not an output of
# OpenAI's chat API: it is refused here (400) rather than returned in a field of our own; the
# gRPC API and the SDK return images (GenerateResponse.outputs).
HTTP_MODALITIES = ("text", "audio")


def _modalities(fields: Mapping[str, Any]) -> list[str]:
    """``modalities`` (["text"] or ["text", "audio"]) and its ``audio`` options: format "wav"
    (the only one produced); ``voice`` is accepted and has no effect (the model's own)."""
    value = fields.get("modalities")
    audio = fields.get("audio")
    if value is None:
        value = ["text"]
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise invalid("modalities", f"must be a list of strings, got {value!r}")
    for modality in value:
        if modality == "image":
            raise invalid(
                "modalities",
                "image output is not part of the chat completions API; use the gRPC API or the "
                'SDK (modalities=["text", "image"]) for images',
            )
        if modality not in HTTP_MODALITIES:
            raise invalid(
                "modalities", f"unknown modality {modality!r} (known: {', '.join(HTTP_MODALITIES)})"
            )
    if audio is not None:
        if not isinstance(audio, dict):
            raise invalid("audio", f"must be an object, got {audio!r}")
        if "audio" not in value:
            raise invalid("audio", 'is only allowed with modalities ["text", "audio"]')
        if audio.get("format", "wav") != "wav":
            raise invalid("audio.format", f"only 'wav' is produced, got {audio.get('format')!r}")
    return [] if value == ["text"] else list(value)


class MediaItems:
    """Assembles the media items of a response stream from their pieces (the coordinator
    relays an item only whole, possibly over several messages)."""

    def __init__(self) -> None:
        self._partial: dict[int, list[bytes]] = {}

    def add(self, response: generate_pb2.GenerateResponse) -> list[tuple[int, str, bytes]]:
        """The items ``response`` completes: (index, mime type, bytes)."""
        done: list[tuple[int, str, bytes]] = []
        for piece in response.outputs:
            pieces = self._partial.setdefault(piece.index, [])
            pieces.append(piece.data)
            if piece.last_chunk:
                del self._partial[piece.index]
                done.append((piece.index, piece.mime_type, b"".join(pieces)))
        return done


# How long OpenAI says an audio output can be referred to in later turns; ours are not kept,
# the field is filled for the clients that read it.
AUDIO_EXPIRES_S = 3600


def audio_id(call: Call, index: int) -> str:
    return f"audio_{call.request.request_id}_{index}"


# -- answers ---------------------------------------------------------------------------------


def response_id(call: Call) -> str:
    return ("chatcmpl-" if call.chat else "cmpl-") + call.request.request_id


def usage_of(response: generate_pb2.GenerateResponse) -> dict[str, Any]:
    """OpenAI's usage from the last GenerateResponse's (the gRPC path's figures), with the
    prompt tokens found in the engine's prefix cache as ``prompt_tokens_details.cached_tokens``
    (as vLLM's server reports them)."""
    prompt = response.usage.prompt_tokens
    completion = response.usage.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": response.usage.cached_prompt_tokens},
    }


@dataclass
class Answer:
    """A non-streamed answer, collected from the GenerateResponses."""

    call: Call
    created: int
    model: str
    text: list[str] = field(default_factory=list)
    last: generate_pb2.GenerateResponse | None = None
    media: MediaItems = field(default_factory=MediaItems)
    audio: list[tuple[int, bytes]] = field(default_factory=list)

    def add(self, response: generate_pb2.GenerateResponse) -> None:
        self.text.append(response.text)
        self.last = response
        for index, mime, data in self.media.add(response):
            if mime.startswith("audio/"):
                self.audio.append((index, data))

    def payload(self) -> dict[str, Any]:
        last = self.last or generate_pb2.GenerateResponse()
        text = "".join(self.text)
        choice: dict[str, Any] = {"index": 0}
        if self.call.chat:
            choice["message"] = {"role": "assistant", "content": text}
            if self.audio:
                # As OpenAI: the spoken reply in message.audio, its text as the transcript.
                index, data = self.audio[0]
                choice["message"] = {
                    "role": "assistant",
                    "content": None,
                    "audio": {
                        "id": audio_id(self.call, index),
                        "data": base64.b64encode(data).decode("ascii"),
                        "expires_at": self.created + AUDIO_EXPIRES_S,
                        "transcript": text,
                    },
                }
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = last.finish_reason or None
        return {
            "id": response_id(self.call),
            "object": "chat.completion" if self.call.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_of(last),
        }


def dumps(value: object) -> bytes:
    """Compact JSON (ASCII: a lone surrogate in text cannot break the encoding)."""
    return _ENCODER.encode(value).encode()


_ENCODER = json.JSONEncoder(separators=(",", ":"))
DONE = b"data: [DONE]\n\n"


class ChunkEncoder:
    """The SSE events of one streamed answer.

    Every chunk of a stream shares its id, object, created and model: those bytes are
    encoded once, and each chunk encodes only its text (the hot path: one chunk per
    GenerateResponse; see docs/http.md for the measurement)."""

    def __init__(self, call: Call, created: int, model: str) -> None:
        self.chat = call.chat
        self._call = call
        self.media = MediaItems()
        obj = "chat.completion.chunk" if call.chat else "text_completion"
        head = (b'data: {"id":' + dumps(response_id(call)) + b',"object":' + dumps(obj)) + (
            b',"created":%d,"model":' % created + dumps(model)
        )
        self._head = head + b',"choices":[{"index":0,'
        self._usage_head = head + b',"choices":[],"usage":'
        # With include_usage, OpenAI sends "usage": null on every chunk but the last.
        self._tail = b"}]" + (b',"usage":null' if call.include_usage else b"") + b"}\n\n"
        self._role_sent = False

    @property
    def needs_role(self) -> bool:
        """A chat's first chunk carries the role: sent even without text."""
        return self.chat and not self._role_sent

    def delta(self, text: str, finish_reason: str = "") -> bytes:
        """A chunk carrying ``text`` (and the finish reason on the last one)."""
        finish = dumps(finish_reason) if finish_reason else b"null"
        if not self.chat:
            body = b'"text":' + dumps(text)
        elif self._role_sent:
            body = b'"delta":{"content":' + dumps(text) + b"}"
        else:
            # The first delta of a chat carries the role, as OpenAI's does.
            self._role_sent = True
            body = b'"delta":{"role":"assistant","content":' + dumps(text) + b"}"
        return self._head + body + b',"logprobs":null,"finish_reason":' + finish + self._tail

    def audio(self, response: generate_pb2.GenerateResponse) -> bytes:
        """The chunks of the audio items ``response`` completes (``delta.audio``: id, data in
        base64), as OpenAI streams them; empty when it completes none."""
        out = b""
        for index, mime, data in self.media.add(response):
            if not mime.startswith("audio/"):
                continue
            audio = {"id": audio_id(self._call, index), "data": base64.b64encode(data).decode()}
            role = b"" if self._role_sent else b'"role":"assistant",'
            self._role_sent = True
            body = b'"delta":{' + role + b'"audio":' + dumps(audio) + b"}"
            out += self._head + body + b',"logprobs":null,"finish_reason":null' + self._tail
        return out

    def usage(self, response: generate_pb2.GenerateResponse) -> bytes:
        """The last chunk with include_usage: no choices, the whole call's usage."""
        return self._usage_head + dumps(usage_of(response)) + b"}\n\n"


def error_event(error: ApiError) -> bytes:
    """An error after the stream started (the status line is long gone): an SSE event with
    OpenAI's error object, as vLLM sends; the official clients raise it."""
    return b"data: " + dumps(error.payload()) + b"\n\n"
