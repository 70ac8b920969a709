"""What the SDK hands back: results, streamed deltas and the error of a failed request."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

Prompt = str | Sequence[int]


class GenerationError(RuntimeError):
    """A request that could not be served; ``code`` is the gRPC status."""

    def __init__(
        self, code: grpc.StatusCode, message: str, request_id: str = "", index: int | None = None
    ) -> None:
        where = f"prompt #{index}: " if index is not None else ""
        super().__init__(f"{where}{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.index = index


class CoordinatorUnreachableError(GenerationError, ConnectionError):
    """No connection to a coordinator this orchestrator has never reached, within its
    ``connect_timeout`` (``code`` is UNAVAILABLE; also a ``ConnectionError``)."""

    def __init__(self, address: str, waited_s: float) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            f"coordinator at {address} is unreachable: no connection within {waited_s:g} s "
            "(connect_timeout)",
        )
        self.address = address
        self.waited_s = waited_s


# File extensions ``MediaOutput.save`` picks for a folder, by mime type.
EXTENSIONS = {
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/mpeg": ".mp3",
    "audio/ogg": ".ogg",
    "audio/flac": ".flac",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "video/mp4": ".mp4",
}


@dataclass
class MediaOutput:
    """One media output item of a generation (audio, image), whole."""

    index: int
    mime_type: str
    data: bytes

    @property
    def extension(self) -> str:
        """The file extension for its mime type (".bin" for an unknown one)."""
        return EXTENSIONS.get(self.mime_type, ".bin")

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the bytes to ``path``; a folder gets ``output-INDEX.EXT`` inside it, the
        extension chosen from the mime type. Returns the path written."""
        target = os.fspath(path)
        if os.path.isdir(target):
            target = os.path.join(target, f"output-{self.index}{self.extension}")
        with open(target, "wb") as f:
            f.write(self.data)
        return target


@dataclass
class GenerationDelta:
    """One streamed message: new text and token ids since the previous delta."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    node_id: str
    attempt: int
    request_id: str
    # Set on the last delta: token counts of the whole generation.
    usage: dict[str, int] | None = None
    # Media output items that completed with this delta (each item once, whole).
    outputs: list[MediaOutput] = field(default_factory=list)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    node_id: str
    # Nodes that worked on the request, in order (more than one after a failover).
    attempts: int
    usage: dict[str, int]
    request_id: str = ""
    nodes: list[str] = field(default_factory=list)
    # Media outputs (requests with modalities such as ["text", "audio"]), by index.
    outputs: list[MediaOutput] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text
