"""The engine interface a node agent drives: one engine per agent, one per GPU.

The agent speaks gRPC; the engine knows nothing about it. What crosses this boundary is an
``EngineRequest`` in and ``Delta`` objects out.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from omni_rpc.validation import InvalidRequest, Sampling


class EngineError(Exception):
    """The engine failed a request for a reason of its own (a node-level failure)."""


class EngineDead(EngineError):
    """The engine is gone; the agent reports NOT_SERVING until it is restarted."""


class EngineOverloaded(EngineError):
    """The engine cannot take the request now; another node may."""


@dataclass(frozen=True)
class MediaInput:
    """A media input: an image, an audio clip, a video (validated: an image/*, audio/* or
    video/* mime type, and data)."""

    mime_type: str
    data: bytes


@dataclass(frozen=True)
class ChatTurn:
    """One turn of a chat the engine renders with its model's chat template."""

    role: str
    content: str
    # The turn's media parts, in order (``content`` holds its text parts).
    media: tuple[MediaInput, ...] = ()


@dataclass(frozen=True)
class EngineRequest:
    # The engine's id for this attempt, unique in the agent's process (``engine_request_id``):
    # not the client's request_id, which two concurrent calls may share, and which an engine's
    # abort (by id) would end for both.
    request_id: str
    sampling: Sampling
    prompt: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    # Media inputs (GenerateRequest.inputs), in order; a chat's media parts are in its turns.
    inputs: tuple[MediaInput, ...] = ()
    # A chat instead of a prompt: the engine renders it with the model's chat template, the
    # assistant's turn opened (``prompt`` and ``prompt_token_ids`` are empty then).
    messages: tuple[ChatTurn, ...] = ()
    # Output another node already delivered: continue after it (see the Resume message).
    resume_token_ids: tuple[int, ...] = ()
    resume_text: str = ""
    # sampling.max_tokens is the server's default, not the client's: an engine lowers it to
    # what the model's context leaves after the prompt (as vLLM's OpenAI server does) instead
    # of refusing the request (see ``context_budget``).
    default_max_tokens: bool = False
    # Output modalities asked for (GenerateRequest.modalities): media items follow the text.
    modalities: tuple[str, ...] = ()
    # Media items another node already delivered whole: produce only those after them.
    media_items_delivered: int = 0


@dataclass(frozen=True)
class MediaPiece:
    """A piece of one media output item: items travel in order, each in one or more pieces;
    the piece with ``last_chunk`` completes item ``index``."""

    index: int
    mime_type: str
    data: bytes
    last_chunk: bool = False


@dataclass
class Delta:
    """New output since the previous delta of the same request."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # None until the last delta: "stop", "length" or "abort".
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens found in the engine's prefix cache (set with finish_reason).
    cached_prompt_tokens: int = 0
    # Media output pieces, in order (they come after the text of the same delta).
    outputs: list[MediaPiece] = field(default_factory=list)

    def merge(self, later: Delta) -> None:
        """Absorb a later delta of the same request (used to coalesce ready deltas)."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        self.outputs.extend(later.outputs)
        self.finish_reason = later.finish_reason
        self.prompt_tokens = later.prompt_tokens
        self.completion_tokens = later.completion_tokens
        self.cached_prompt_tokens = later.cached_prompt_tokens


@dataclass(frozen=True)
class EngineLoad:
    running: int = 0
    waiting: int = 0
    capacity: int = 0
    kv_cache_usage: float = 0.0
    started: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    rejected: int = 0
    generated_tokens: int = 0
    # Prompt tokens of the requests that finished, and those of them found in the prefix cache.
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


HealthListener = Callable[[bool], None]


def context_budget(request: EngineRequest, prompt_tokens: int, max_model_len: int | None) -> int:
    """The tokens ``request`` may generate in all (its max_tokens), or InvalidRequest when its
    prompt and completion do not fit the model's context of ``max_model_len`` tokens.

    Counts the original prompt (``prompt_tokens``, without resumed tokens) and the original
    max_tokens: on a resumed attempt the prompt, the resumed tokens and the remaining ones add
    up to the same total, so every attempt of a request gets the same answer. A request that
    does not fit is refused, never clamped; one whose max_tokens is the server's default
    (``default_max_tokens``) gets what the context leaves, and is refused only when that is
    nothing.
    """
    max_tokens = request.sampling.max_tokens
    if max_model_len is None:
        return max_tokens
    if request.default_max_tokens and prompt_tokens < max_model_len:
        return min(max_tokens, max_model_len - prompt_tokens)
    if prompt_tokens + max_tokens > max_model_len:
        where = "messages" if request.messages else "prompt"
        raise InvalidRequest(
            where,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {where}, "
            f"{max_tokens} for the completion). Please reduce the length of the {where} or "
            f"completion.",
        )
    return max_tokens


_engine_ids = itertools.count(1)


def engine_request_id(request_id: str, attempt: int) -> str:
    """The id an engine gets for one attempt of the client's ``request_id``: unique in this
    process (a counter ends it), readable in the engine's logs (the client's id starts it)."""
    return f"{request_id}-{attempt}-{next(_engine_ids)}"


class Engine(abc.ABC):
    """What a node agent needs from an inference engine."""

    #: Short name reported to the coordinator ("sim", "vllm").
    kind: str = ""
    #: The model this engine serves.
    model: str = ""
    #: Media modalities the model takes as input ("image", "audio", "video") and produces as
    #: output ("audio", "image"), besides text: advertised when the agent joins (routing by
    #: modality), and the agent refuses media requests beyond them.
    input_modalities: tuple[str, ...] = ()
    output_modalities: tuple[str, ...] = ()
    #: The engine's prefix cache: block size and capacity, in tokens (0: none or unknown),
    #: advertised when the agent joins (the coordinator's cache_aware index follows them).
    #: Known once ``start`` has returned.
    cache_block_tokens: int = 0
    cache_capacity_tokens: int = 0
    #: Failure modes ``set_fault`` accepts (an engine without fault injection has none).
    faults: tuple[str, ...] = ()
    #: The failure mode switched on now.
    fault: str = "none"

    def __init__(self) -> None:
        self._health_listeners: list[HealthListener] = []

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; return when requests can be served."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        """Stream the deltas of one request. Closing the iterator aborts the request."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running or queued request; a no-op for unknown or finished ones."""

    @abc.abstractmethod
    def is_healthy(self) -> bool: ...

    @abc.abstractmethod
    def load(self) -> EngineLoad: ...

    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """How many requests run at once before the rest queue."""

    @abc.abstractmethod
    async def stop(self) -> None: ...

    def set_fault(self, mode: str) -> None:
        """Switch a failure mode on ("none" switches them off); for tests and chaos runs."""
        raise ValueError(f"engine {self.kind!r} has no fault injection")

    def add_health_listener(self, listener: HealthListener) -> None:
        """Call ``listener(healthy)`` whenever the engine's health changes."""
        self._health_listeners.append(listener)

    def _notify_health(self, healthy: bool) -> None:
        for listener in self._health_listeners:
            listener(healthy)
