"""Chat messages in OpenAI's shape, checked on the client and turned into ``ChatMessage``.

``[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]``, or with
content as parts: ``{"role": "user", "content": [{"type": "text", "text": "Hi"}]}``. The
serving node renders the chat with its model's chat template. Mistakes fail here, before any
traffic: the wrong type (not a list of dicts, content neither a string nor a list of parts)
is a ``TypeError``; a wrong value (an empty role, an unknown key or part type, too many
messages, bad media) is a ``ValueError``.

Media parts, in OpenAI's shapes: ``{"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}}`` (a ``data:`` URL: nothing is fetched) and ``{"type":
"input_audio", "input_audio": {"data": BASE64, "format": "wav"}}`` (mime type audio/FORMAT);
or, without base64, ``{"type": "audio", "data": b"...", "mime_type": "audio/wav"}`` (also
``"image"`` and ``"video"``). Prompts take media as ``inputs=[Media(...)]`` or
``inputs=[("image/png", b"...")]`` (``media_inputs``). Media must be image/*, audio/* or
video/* with data; the coordinator routes it to nodes whose model takes it.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omni_rpc import config
from omni_rpc.v1 import generate_pb2
from omni_rpc.validation import validate_media

# The keys of one message, the media part types taken (OpenAI's, and raw bytes), and the others
# OpenAI's API names for media (refused, never dropped).
MESSAGE_KEYS = ("role", "content")
RAW_MEDIA_PARTS = ("image", "audio", "video")
MEDIA_PART_TYPES = ("image_url", "input_audio", *RAW_MEDIA_PARTS, "input_image", "file")
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Media:
    """A media input: ``Media("image/png", png_bytes)``."""

    mime_type: str
    data: bytes


MediaLike = Media | tuple[str, bytes]


def _checked(where: str, mime_type: object, data: object) -> generate_pb2.Media:
    if not isinstance(mime_type, str):
        raise TypeError(f"{where}: the mime type must be a string, got {type(mime_type).__name__}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"{where}: the data must be bytes, got {type(data).__name__}")
    media = generate_pb2.Media(mime_type=mime_type, data=bytes(data))
    validate_media(media, where)  # InvalidRequest is a ValueError
    return media


def media_inputs(inputs: Iterable[MediaLike]) -> list[generate_pb2.Media]:
    """``inputs`` (``Media`` or ``(mime_type, data)`` tuples) as ``GenerateRequest.inputs``;
    TypeError or ValueError naming the one that is wrong."""
    if isinstance(inputs, str | bytes | Media) or not isinstance(inputs, Iterable):
        raise TypeError(
            "inputs must be a list of Media(mime_type, data) or (mime_type, data) tuples, got "
            f"{type(inputs).__name__}"
        )
    out = []
    for index, item in enumerate(inputs):
        where = f"inputs[{index}]"
        if isinstance(item, Media):
            out.append(_checked(where, item.mime_type, item.data))
        elif isinstance(item, tuple) and len(item) == 2:
            out.append(_checked(where, item[0], item[1]))
        else:
            raise TypeError(
                f"{where} must be a Media(mime_type, data) or a (mime_type, data) tuple, "
                f"got {item!r}"[:200]
            )
    return out


def _b64(where: str, text: object) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: not valid base64") from None


def _keys(where: str, value: Any, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(value).__name__}")
    unknown = set(value) - set(allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    return value


def _media_part(where: str, kind: str, part: Mapping[str, Any]) -> generate_pb2.Media:
    if kind in RAW_MEDIA_PARTS:
        _keys(where, part, ("type", "data", "mime_type"))
        mime = part.get("mime_type")
        if isinstance(mime, str) and not mime.lower().startswith(f"{kind}/"):
            raise ValueError(f"{where}: a {kind} part's mime_type must be {kind}/*, got {mime!r}")
        return _checked(where, mime, part.get("data"))
    _keys(where, part, ("type", kind))
    if kind == "image_url":
        image = _keys(f"{where}.image_url", part.get("image_url"), ("url", "detail"))
        if image.get("detail", "auto") != "auto":
            raise ValueError(f"{where}.image_url.detail: only 'auto' is supported")
        url = image.get("url")
        if not isinstance(url, str):
            raise TypeError(f"{where}.image_url.url must be a string, got {type(url).__name__}")
        match = _DATA_URL.match(url)
        if match is None or "base64" not in match.group(2).split(";"):
            raise ValueError(
                f"{where}.image_url.url: only base64 data: URLs are supported "
                "(data:image/png;base64,...): nothing is fetched"
            )
        mime = match.group(1)
        if not mime.lower().startswith("image/"):
            raise ValueError(f"{where}.image_url.url: must be an image/* data: URL, got {mime!r}")
        return _checked(where, mime, _b64(f"{where}.image_url.url", match.group(3)))
    audio = _keys(f"{where}.input_audio", part.get("input_audio"), ("data", "format"))
    fmt = audio.get("format")
    if not isinstance(fmt, str) or not fmt:
        raise ValueError(f"{where}.input_audio.format: an audio format (wav, mp3), got {fmt!r}")
    return _checked(where, f"audio/{fmt}", _b64(f"{where}.input_audio.data", audio.get("data")))


ChatMessages = Sequence[Mapping[str, Any]]


def _part(where: str, part: Any) -> generate_pb2.ContentPart:
    if not isinstance(part, Mapping):
        raise TypeError(
            f"{where} must be a dict like {{'type': 'text', 'text': ...}}, got {part!r}"
        )
    kind = part.get("type")
    if kind in ("image_url", "input_audio", *RAW_MEDIA_PARTS):
        return generate_pb2.ContentPart(media=_media_part(where, kind, part))
    if kind in MEDIA_PART_TYPES:
        raise ValueError(
            f"{where}: {kind} parts are not supported (image_url with a data: URL, "
            "input_audio, image, audio and video are)"
        )
    if kind != "text":
        raise ValueError(
            f"{where}: unknown part type {kind!r} (supported: 'text', 'image_url', "
            "'input_audio', 'image', 'audio', 'video')"
        )
    unknown = set(part) - {"type", "text"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    text = part.get("text")
    if not isinstance(text, str):
        raise TypeError(f"{where}.text must be a string, got {type(text).__name__}")
    return generate_pb2.ContentPart(text=text)


def _message(index: int, message: Any) -> generate_pb2.ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise TypeError(
            f"{where} must be a dict like {{'role': 'user', 'content': 'Hi'}}, got {message!r}"
        )
    unknown = set(message) - set(MESSAGE_KEYS)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
            f"(supported: {', '.join(MESSAGE_KEYS)})"
        )
    role = message.get("role")
    if not isinstance(role, str):
        raise TypeError(f"{where}.role must be a string, got {type(role).__name__}")
    if not role:
        raise ValueError(f"{where}.role must not be empty")
    if len(role) > config.MAX_CHAT_ROLE_CHARS:
        raise ValueError(f"{where}.role: at most {config.MAX_CHAT_ROLE_CHARS} characters")
    if "content" not in message:
        raise ValueError(f"{where} has no content")
    content = message["content"]
    if isinstance(content, str):
        return generate_pb2.ChatMessage(role=role, content=content)
    if not isinstance(content, Sequence):
        raise TypeError(
            f"{where}.content must be a string or a list of parts, got {type(content).__name__}"
        )
    if not content:
        raise ValueError(f"{where}.content: a list of parts must not be empty")
    parts = [_part(f"{where}.content[{n}]", part) for n, part in enumerate(content)]
    return generate_pb2.ChatMessage(role=role, parts=parts)


def chat_messages(messages: ChatMessages) -> list[generate_pb2.ChatMessage]:
    """``messages`` as ``GenerateRequest.messages``; TypeError or ValueError naming the
    message (``messages[1].content[0]``) that is wrong."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise TypeError(
            "messages must be a list of dicts like [{'role': 'user', 'content': 'Hi'}], got "
            f"{type(messages).__name__} (for a plain prompt use generate_one() or stream())"
        )
    if not messages:
        raise ValueError("messages must not be empty")
    if len(messages) > config.MAX_CHAT_MESSAGES:
        raise ValueError(f"at most {config.MAX_CHAT_MESSAGES} messages, got {len(messages)}")
    return [_message(index, message) for index, message in enumerate(messages)]
