"""Chat messages in OpenAI's shape, checked on the client and turned into ``ChatMessage``.

``[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]``, or with
content as parts: ``{"role": "user", "content": [{"type": "text", "text": "Hi"}]}``. The
serving node renders the chat with its model's chat template. Mistakes fail here, before any
traffic: the wrong type (not a list of dicts, content neither a string nor a list of parts)
is a ``TypeError``; a wrong value (an empty role, an unknown key or part type, too many
messages) is a ``ValueError``; image, audio and other media parts are a ``ValueError`` saying
they are not supported yet (never silently dropped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omni_rpc import config
from omni_rpc.v1 import generate_pb2

# The keys of one message, and the part types OpenAI's API names for media: refused until
# multimodal support lands.
MESSAGE_KEYS = ("role", "content")
MEDIA_PART_TYPES = ("image_url", "image", "input_image", "input_audio", "audio", "video", "file")

ChatMessages = Sequence[Mapping[str, Any]]


def _part(where: str, part: Any) -> generate_pb2.ContentPart:
    if not isinstance(part, Mapping):
        raise TypeError(
            f"{where} must be a dict like {{'type': 'text', 'text': ...}}, got {part!r}"
        )
    kind = part.get("type")
    if kind in MEDIA_PART_TYPES:
        raise ValueError(f"{where}: {kind} parts are not supported yet (text parts only)")
    if kind != "text":
        raise ValueError(f"{where}: unknown part type {kind!r} (supported: 'text')")
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
