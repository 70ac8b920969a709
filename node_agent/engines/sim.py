"""The simulated engine: vLLM's behaviour without a GPU, for tests, benchmarks and planning.

Output is a pure function, so a test can compute what any request must return:

* The prompt key is the prompt text (UTF-8) or, for token-id prompts, the ids joined by
  commas; ``seed`` defaults to 0.
* A chat (``messages``) is first rendered to a text prompt by the simulated model's chat
  template (``render_chat``): ``<|ROLE|>`` + newline + the content + newline for each turn, in
  order, then ``<|assistant|>`` + newline (the assistant's turn opened). From there on it is
  that prompt: same output, same ``prompt_tokens``.
* Media inputs (images, audio, video: the request's ``inputs``, then the media parts of its
  chat's turns, in order; ``request_media``) are part of the prompt: each is digested as
  ``blake2b(mime_type (UTF-8) + b"\\0" + data, digest_size=16)`` and those digests, in order,
  are appended to the key before it is digested (``_prompt_digest``), so the output (text and
  media outputs) depends on every input's mime type and bytes. They add no ``prompt_tokens``,
  and a request without media gets the same output as before media existed. The simulated
  model takes the input modalities of ``--sim-input-modalities`` (default image, audio, video)
  and produces those of ``--sim-output-modalities`` (default audio, image); the agent refuses
  others (INVALID_ARGUMENT) and the coordinator routes media only to nodes that take it.
* The token at position ``i`` (0-based, counting generated tokens) is
  ``int.from_bytes(blake2b(blake2b(key).digest() + seed(8 bytes, signed big-endian)
  + i(8 bytes big-endian), digest_size=8).digest()) % VOCAB_SIZE``.
* Its text is ``" " + WORDS[token]``, two syllables per word (see ``word``).
* Generation ends with ``length`` after ``max_tokens`` tokens, or with ``stop`` as soon as the
  text contains a stop string: the text is cut just before it (the token that completed it is
  still counted and returned). The simulated model never emits an end-of-sequence token, so
  ``ignore_eos`` changes nothing. Sampling temperature, top_p and top_k do not change output.
* Usage: ``prompt_tokens`` is the number of prompt token ids, or of whitespace-separated words
  of a text prompt (at least 1).
* Context length: ``max_model_len`` (``--sim-max-model-len``, default 32768) bounds
  ``prompt_tokens + max_tokens``; a request beyond it is refused with InvalidRequest
  (INVALID_ARGUMENT), never clamped, in the words of vLLM's server. When max_tokens is the
  server's default rather than the client's, it is lowered to what the context leaves.
* A resumed request (``resume_token_ids``, the tokens another node already delivered) continues
  at position ``len(resume_token_ids)``: the concatenation is exactly the undisturbed output.

``simulate(...)`` computes the whole completion; the engine streams the same thing with time to
first token ``ttft_ms`` (plus the prefill of the prompt tokens not in its prefix cache, see
below) and an inter-token latency of ``itl_ms * (1 + itl_growth * (running - 1))``, so a busier
engine is slower, as a batching engine is. Like vLLM, it runs in steps: every running request
past its first token advances one token at the end of the engine's current step, so the
requests' outputs come out together, once per step, as vLLM's do (and a node agent sends them in
one message). At most ``max_concurrency`` requests run; the rest wait in FIFO order.

Prefix cache (``--sim-prefix-cache-tokens N``, default 0: none; ``--sim-cache-block-tokens B``,
default 16; ``--sim-prefill-us-per-token X``, default 0), modelled on vLLM's automatic prefix
caching. Caching changes when output comes, never what it is:

* The engine's prompt of a request (``cache_tokens``) is its prompt tokens: the token ids of a
  token-id prompt, else the whitespace-separated words of the text prompt (a chat rendered
  first); a resumed request's prompt is followed by its resumed tokens, as vLLM sees it (ids for
  a token-id prompt, else their words, ``word(t)`` without its space). ``n``, its length, is
  ``prompt_tokens`` (at least 1) plus the resumed tokens.
* It is cut into whole blocks of B tokens (a partial last block is never cached). Block ``k``
  is identified by the chain hash ``h_k = blake2b(h_{k-1} + block, digest_size=16)``, ``block``
  being its words joined by single spaces (UTF-8), or its ids in decimal joined by commas;
  ``h_{-1}`` (the chain's start) is ``blake2b(b"ids" or b"text" + the request's media digests, in
  order, digest_size=16)`` (``prompt_block_hashes``). So a block is shared only when the whole
  prefix up to it is, text prompts never share with token-id prompts, and a media-bearing
  prompt shares blocks only with prompts carrying the very same media (same bytes, same order):
  its media is folded into the chain's start, not placed in the token sequence, so it shares
  nothing with a prompt without media, not even the text before the media.
* The cache is an LRU of block hashes holding ``N // B`` blocks (none: nothing is ever cached,
  and the engine advertises block size and capacity 0; else B and N). When a request starts
  running (it has its slot), its leading blocks found in the cache are counted, stopping at the
  first miss: ``cached = min(matched * B, n - 1)`` (vLLM always computes the last prompt token
  again). Then all its whole blocks are inserted or touched, its last block first and its first
  block last (the most recently used), evicting the least recently used beyond capacity: as in
  vLLM, a prompt's tail blocks are evicted before its head. A request refused, or failed before
  it runs, touches nothing; the ``dead`` fault empties the cache (a restarted engine is cold).
* Its time to first token is ``ttft_ms + (n - cached) * prefill_us_per_token / 1000`` ms.
* ``cached`` is reported on its finishing delta (``cached_prompt_tokens``, whatever the finish
  reason; ``prompt_tokens`` stays the original prompt's, so a resumed request's cached tokens
  may exceed it). ``load()`` adds ``n`` and ``cached`` to its lifetime ``prompt_tokens`` and
  ``cached_prompt_tokens`` for each request that finishes (stop or length), so their ratio is the
  engine's hit rate.

Media outputs: a request whose ``modalities`` include "audio" and/or "image" gets, after its
text (and before its finish), one media item per requested modality, in the order audio, image
(indices 0, 1, ...). Both are functions of the media digest ``media_digest(prompt key, seed)`` =
``blake2b(blake2b(key).digest() + seed(8 bytes, signed big-endian), digest_size=8)``:

* audio (``sim_wav``): a WAV, 16 kHz mono 16-bit PCM, ``seconds`` long (``--sim-media-seconds``,
  default ``DEFAULT_MEDIA_SECONDS``): ``round(seconds * 16000)`` samples of a sine tone of
  ``200 + int.from_bytes(digest[0:2], "big") % 800`` Hz, amplitude 8000, sample ``n`` being
  ``round(8000 * sin(2 pi f n / 16000))``; written by the stdlib ``wave`` module.
* image (``sim_png``): a PNG, ``size`` x ``size`` pixels (``--sim-image-size``, default
  ``DEFAULT_IMAGE_SIZE``), 8-bit RGB, pixel (x, y) = ``((digest[0] + x) % 256,
  (digest[1] + y) % 256, digest[2])``, its IDAT stored uncompressed (zlib level 0, so its size
  is about 3 * size**2 bytes); chunks IHDR, IDAT, IEND.

An item travels in pieces of ``MEDIA_CHUNK_BYTES`` (the last piece sets ``last_chunk``), one
piece per engine step, paced like tokens, so a failover can hit the middle of an item. A resumed
request (``media_items_delivered`` = n) produces its remaining text, then only the items with
index >= n, each whole from its start.

Fault injection (``set_fault``, or ``--sim-fault`` and SIGUSR1/SIGUSR2 in the agent):
``dead`` stops the engine (health turns false, running requests fail at their next token,
new ones are refused) until the mode is set back to ``none``; ``fail_requests`` keeps the
engine healthy but fails every request, as a broken GPU that still answers health checks would.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
import struct
import sys
import wave
import zlib
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from node_agent.engine import (
    ChatTurn,
    Delta,
    Engine,
    EngineDead,
    EngineError,
    EngineLoad,
    EngineOverloaded,
    EngineRequest,
    MediaInput,
    MediaPiece,
    context_budget,
)

VOCAB_SIZE = 4096
# The simulated model's context length unless configured (SimConfig.max_model_len).
DEFAULT_MAX_MODEL_LEN = 32768
_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]  # 75


def word(token_id: int) -> str:
    """Text of a token: two syllables, preceded by a space."""
    n = len(_SYLLABLES)
    return " " + _SYLLABLES[token_id % n] + _SYLLABLES[(token_id // n) % n]


def render_chat(messages: Sequence[ChatTurn]) -> str:
    """The simulated model's chat template: ``<|role|>\ncontent\n`` per turn, then the
    assistant's turn opened (``<|assistant|>\n``)."""
    return "".join(f"<|{turn.role}|>\n{turn.content}\n" for turn in messages) + "<|assistant|>\n"


def request_prompt(request: EngineRequest) -> str:
    """The text prompt of ``request``: its prompt, or its chat rendered (``render_chat``)."""
    return render_chat(request.messages) if request.messages else request.prompt


def request_media(request: EngineRequest) -> tuple[MediaInput, ...]:
    """The media inputs of ``request`` in the order they enter the prompt key: its
    ``inputs``, then the media parts of its chat's turns."""
    return (*request.inputs, *(m for turn in request.messages for m in turn.media))


def media_key(media: MediaInput) -> bytes:
    """What one media input adds to the prompt key (see the module docstring)."""
    return hashlib.blake2b(media.mime_type.encode() + b"\0" + media.data, digest_size=16).digest()


def _prompt_digest(
    prompt: str, prompt_token_ids: Sequence[int], media: Sequence[MediaInput] = ()
) -> bytes:
    key = prompt.encode() if prompt else ",".join(map(str, prompt_token_ids)).encode()
    return hashlib.blake2b(key + b"".join(media_key(m) for m in media)).digest()


# Media outputs (see the module docstring).
MEDIA_CHUNK_BYTES = 16 * 1024
DEFAULT_MEDIA_SECONDS = 0.5
DEFAULT_IMAGE_SIZE = 32
WAV_RATE = 16_000
WAV_AMPLITUDE = 8000
# The media modalities the simulated model produces, in the order of its items.
MEDIA_MODALITIES = ("audio", "image")


def media_digest(
    prompt: str = "",
    prompt_token_ids: Sequence[int] = (),
    *,
    seed: int | None = None,
    messages: Sequence[ChatTurn] = (),
    inputs: Sequence[MediaInput] = (),
) -> bytes:
    """The 8 bytes the simulated media outputs of a request are a function of (``inputs``:
    its media inputs, ``request_media``)."""
    if messages:
        prompt = render_chat(messages)
    material = _prompt_digest(prompt, prompt_token_ids, inputs) + (seed or 0).to_bytes(
        8, "big", signed=True
    )
    return hashlib.blake2b(material, digest_size=8).digest()


def wav_bytes(digest: bytes, seconds: float = DEFAULT_MEDIA_SECONDS) -> bytes:
    """The simulated audio for ``digest``: a sine tone as a 16 kHz mono 16-bit WAV."""
    frequency = 200 + int.from_bytes(digest[0:2], "big") % 800
    step = 2 * math.pi * frequency / WAV_RATE
    samples = array(
        "h", (round(WAV_AMPLITUDE * math.sin(step * n)) for n in range(round(seconds * WAV_RATE)))
    )
    if samples.itemsize != 2:  # pragma: no cover - array("h") is 16-bit on every CPython
        raise RuntimeError("16-bit samples expected")
    if sys.byteorder == "big":  # pragma: no cover
        samples.byteswap()
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(WAV_RATE)
        writer.writeframes(samples.tobytes())
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(digest: bytes, size: int = DEFAULT_IMAGE_SIZE) -> bytes:
    """The simulated image for ``digest``: ``size`` x ``size`` RGB, stored uncompressed."""
    rows = bytearray()
    for y in range(size):
        rows.append(0)  # filter type: none
        for x in range(size):
            rows += bytes(((digest[0] + x) % 256, (digest[1] + y) % 256, digest[2]))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(bytes(rows), 0))
        + _png_chunk(b"IEND", b"")
    )


def sim_wav(
    prompt: str = "",
    prompt_token_ids: Sequence[int] = (),
    *,
    seed: int | None = None,
    messages: Sequence[ChatTurn] = (),
    seconds: float = DEFAULT_MEDIA_SECONDS,
) -> bytes:
    """The audio item the simulated engine produces for a request (see the docstring)."""
    digest = media_digest(prompt, prompt_token_ids, seed=seed, messages=messages)
    return wav_bytes(digest, seconds)


def sim_png(
    prompt: str = "",
    prompt_token_ids: Sequence[int] = (),
    *,
    seed: int | None = None,
    messages: Sequence[ChatTurn] = (),
    size: int = DEFAULT_IMAGE_SIZE,
) -> bytes:
    """The image item the simulated engine produces for a request (see the docstring)."""
    digest = media_digest(prompt, prompt_token_ids, seed=seed, messages=messages)
    return png_bytes(digest, size)


def media_pieces(index: int, mime_type: str, data: bytes) -> list[MediaPiece]:
    """``data`` as the pieces of item ``index`` (MEDIA_CHUNK_BYTES each, the last shorter)."""
    starts = range(0, max(1, len(data)), MEDIA_CHUNK_BYTES)
    return [
        MediaPiece(index, mime_type, data[at : at + MEDIA_CHUNK_BYTES], at == starts[-1])
        for at in starts
    ]


def token_at(digest: bytes, seed: int, position: int) -> int:
    material = digest + seed.to_bytes(8, "big", signed=True) + position.to_bytes(8, "big")
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big") % VOCAB_SIZE


def prompt_token_count(prompt: str, prompt_token_ids: Sequence[int]) -> int:
    return len(prompt_token_ids) if prompt_token_ids else max(1, len(prompt.split()))


def cache_tokens(request: EngineRequest) -> list[str] | list[int]:
    """The engine's prompt of ``request`` for prefix caching (see the module docstring): its
    prompt token ids or words, followed by its resumed tokens."""
    if request.prompt_token_ids:
        return [*request.prompt_token_ids, *request.resume_token_ids]
    return [*request_prompt(request).split(), *(word(t)[1:] for t in request.resume_token_ids)]


def prompt_block_hashes(request: EngineRequest, block_tokens: int) -> list[bytes]:
    """The chain hashes of the whole blocks of ``request``'s engine prompt (``cache_tokens``),
    in order (see the module docstring)."""
    tokens = cache_tokens(request)
    ids = bool(request.prompt_token_ids)
    seed = b"ids" if ids else b"text"
    current = hashlib.blake2b(
        seed + b"".join(media_key(m) for m in request_media(request)), digest_size=16
    ).digest()
    hashes = []
    for at in range(0, len(tokens) - block_tokens + 1, block_tokens):
        block = tokens[at : at + block_tokens]
        material = ",".join(map(str, block)) if ids else " ".join(map(str, block))
        current = hashlib.blake2b(current + material.encode(), digest_size=16).digest()
        hashes.append(current)
    return hashes


class PrefixCache:
    """An LRU of block hashes holding ``capacity_blocks`` blocks (see the module docstring)."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: bytes) -> bool:
        return block in self._blocks

    def match(self, blocks: Sequence[bytes]) -> int:
        """How many of ``blocks``, from the first, are cached (up to the first miss)."""
        matched = 0
        for block in blocks:
            if block not in self._blocks:
                break
            matched += 1
        return matched

    def touch(self, blocks: Sequence[bytes]) -> None:
        """Insert or refresh ``blocks``, the last first and the first last (the most recently
        used), then evict the least recently used beyond capacity."""
        for block in reversed(blocks):
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


def _find_stop(text: str, stop: Sequence[str]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


def simulate(
    prompt: str = "",
    prompt_token_ids: Sequence[int] = (),
    *,
    max_tokens: int,
    seed: int | None = None,
    stop: Sequence[str] = (),
    messages: Sequence[ChatTurn] = (),
    inputs: Sequence[MediaInput] = (),
) -> Completion:
    """The complete output the simulated engine produces for a request (a chat: ``messages``;
    ``inputs``: its media inputs in ``request_media`` order, chat parts included)."""
    if messages:
        prompt = render_chat(messages)
    digest = _prompt_digest(prompt, prompt_token_ids, inputs)
    text, ids = "", []
    for position in range(max_tokens):
        token = token_at(digest, seed or 0, position)
        ids.append(token)
        text += word(token)
        cut = _find_stop(text, stop)
        if cut >= 0:
            return Completion(text[:cut], ids, "stop", prompt_token_count(prompt, prompt_token_ids))
    return Completion(text, ids, "length", prompt_token_count(prompt, prompt_token_ids))


@dataclass(frozen=True)
class SimConfig:
    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    # Relative slow-down of each token per additional running request.
    itl_growth: float = 0.02
    max_concurrency: int = 64
    # Requests allowed to wait for a slot; beyond it the engine is full (None: no limit).
    max_queue: int | None = None
    model: str = "sim"
    # prompt_tokens + max_tokens of a request may not exceed this (None: no limit).
    max_model_len: int | None = DEFAULT_MAX_MODEL_LEN
    # The media modalities the simulated model takes and produces, besides text.
    input_modalities: tuple[str, ...] = ("image", "audio", "video")
    output_modalities: tuple[str, ...] = ("audio", "image")
    # Media outputs (see the module docstring): audio length and image side.
    media_seconds: float = DEFAULT_MEDIA_SECONDS
    image_size: int = DEFAULT_IMAGE_SIZE
    # The prefix cache (see the module docstring): capacity in tokens (0: none), block size,
    # and the prefill cost of each prompt token not found in it (0: ttft_ms whatever the prompt).
    prefix_cache_tokens: int = 0
    cache_block_tokens: int = 16
    prefill_us_per_token: float = 0.0


FAULTS = ("none", "dead", "fail_requests")


@dataclass(eq=False)
class _Aborted:
    """One request's abort flag (set by ``abort``, seen at its next token)."""

    set: bool = False


class SimEngine(Engine):
    kind = "sim"
    faults = FAULTS

    def __init__(self, cfg: SimConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or SimConfig()
        self.model = self.cfg.model
        self.input_modalities = self.cfg.input_modalities
        self.output_modalities = self.cfg.output_modalities
        if self.cfg.cache_block_tokens < 1:
            raise ValueError(f"cache_block_tokens must be >= 1, got {self.cfg.cache_block_tokens}")
        self._cache = PrefixCache(self.cfg.prefix_cache_tokens // self.cfg.cache_block_tokens)
        if self._cache.capacity_blocks > 0:
            self.cache_block_tokens = self.cfg.cache_block_tokens
            self.cache_capacity_tokens = self.cfg.prefix_cache_tokens
        self._prompt_tokens = self._cached_prompt_tokens = 0
        self._slots = asyncio.Semaphore(self.cfg.max_concurrency)
        self._running = 0
        self._waiting = 0
        # The requests this engine has (waiting or running), by id, each with its abort flag.
        # Like vLLM, abort(id) aborts every request it has with that id (ids are meant to be
        # unique) and ignores any other id; a later request reusing the id is not affected.
        self._active: dict[str, list[_Aborted]] = {}
        self._healthy = False
        self._started = self._finished = self._aborted = self._failed = 0
        self._generated_tokens = 0
        self.fault = "none"
        self._rejected = 0
        # The end of the engine's current step: set when it comes, replaced by the next one.
        self._step: asyncio.Event | None = None

    @property
    def capacity(self) -> int:
        return self.cfg.max_concurrency

    async def start(self) -> None:
        self._set_healthy(self.fault != "dead")

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self._healthy:
            self._healthy = healthy
            self._notify_health(healthy)

    def set_fault(self, mode: str) -> None:
        if mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r} (known: {', '.join(FAULTS)})")
        self.fault = mode
        if mode == "dead":
            self._cache.clear()  # a crashed engine restarts cold
        self._set_healthy(mode != "dead")

    async def stop(self) -> None:
        self._set_healthy(False)

    def is_healthy(self) -> bool:
        return self._healthy

    async def abort(self, request_id: str) -> None:
        for flag in self._active.get(request_id, ()):
            flag.set = True

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=self._running,
            waiting=self._waiting,
            capacity=self.cfg.max_concurrency,
            kv_cache_usage=self._running / self.cfg.max_concurrency,
            started=self._started,
            finished=self._finished,
            aborted=self._aborted,
            failed=self._failed,
            rejected=self._rejected,
            generated_tokens=self._generated_tokens,
            prompt_tokens=self._prompt_tokens,
            cached_prompt_tokens=self._cached_prompt_tokens,
        )

    def _inter_token_s(self) -> float:
        return self.cfg.itl_ms * (1.0 + self.cfg.itl_growth * max(0, self._running - 1)) / 1000.0

    async def _next_step(self) -> None:
        """Wait for the end of the engine's current step (the first waiter starts one).

        One timer per step for all running requests, not one per request and token; an Event,
        so a request that is cancelled while waiting leaves the step to the others.
        """
        step = self._step
        if step is None or step.is_set():
            step = self._step = asyncio.Event()
            asyncio.get_running_loop().call_later(self._inter_token_s(), step.set)
        await step.wait()

    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        if not self._healthy:
            raise EngineDead("simulated engine is not running")
        prompt = request_prompt(request)
        prompt_tokens = prompt_token_count(prompt, request.prompt_token_ids)
        # Refused before the engine takes it (InvalidRequest: not the engine's work).
        max_tokens = context_budget(request, prompt_tokens, self.cfg.max_model_len)
        self._started += 1
        outcome = "aborted"  # unless the stream reaches its end or the engine fails
        flag = _Aborted()
        self._active.setdefault(request.request_id, []).append(flag)
        try:
            if self.fault == "fail_requests":
                raise EngineError("injected failure: the engine fails every request")
            full = self._running >= self.cfg.max_concurrency
            if full and self.cfg.max_queue is not None and self._waiting >= self.cfg.max_queue:
                raise EngineOverloaded(
                    f"engine full: {self._running} running, {self._waiting} waiting "
                    f"(max_queue {self.cfg.max_queue})"
                )
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
            self._running += 1
            try:
                engine_prompt, cached = self._prefill(request, prompt_tokens)
                prefill_s = (engine_prompt - cached) * self.cfg.prefill_us_per_token / 1e6
                ttft_s = self.cfg.ttft_ms / 1000.0 + prefill_s
                async for delta in self._stream(request, prompt, max_tokens, flag, ttft_s):
                    if delta.finish_reason is not None:
                        delta.cached_prompt_tokens = cached
                        outcome = "aborted" if delta.finish_reason == "abort" else "finished"
                        if outcome == "finished":
                            self._prompt_tokens += engine_prompt
                            self._cached_prompt_tokens += cached
                    yield delta
            finally:
                self._running -= 1
                self._slots.release()
        except EngineOverloaded:
            outcome = "rejected"
            raise
        except EngineError:
            outcome = "failed"
            raise
        finally:
            self._count(outcome)
            flags = self._active[request.request_id]
            flags.remove(flag)
            if not flags:
                del self._active[request.request_id]

    def _prefill(self, request: EngineRequest, prompt_tokens: int) -> tuple[int, int]:
        """A request starts running: its engine prompt's length and the tokens of it found in
        the prefix cache, whose blocks it then holds (see the module docstring)."""
        engine_prompt = prompt_tokens + len(request.resume_token_ids)
        if self._cache.capacity_blocks <= 0:
            return engine_prompt, 0
        block = self.cfg.cache_block_tokens
        blocks = prompt_block_hashes(request, block)
        cached = max(0, min(self._cache.match(blocks) * block, engine_prompt - 1))
        self._cache.touch(blocks)
        return engine_prompt, cached

    def _count(self, outcome: str) -> None:
        if outcome == "finished":
            self._finished += 1
        elif outcome == "failed":
            self._failed += 1
        elif outcome == "rejected":
            self._rejected += 1
        else:
            self._aborted += 1

    async def _stream(
        self,
        request: EngineRequest,
        prompt: str,
        max_tokens: int,
        aborted: _Aborted,
        ttft_s: float,
    ) -> AsyncIterator[Delta]:
        s = request.sampling
        digest = _prompt_digest(prompt, request.prompt_token_ids, request_media(request))
        prompt_tokens = prompt_token_count(prompt, request.prompt_token_ids)
        # Text that could still turn out to be the start of a stop string is held back, as
        # vLLM does, so the streamed text always adds up to the final text.
        holdback = max((len(x) for x in s.stop), default=1) - 1
        start = len(request.resume_token_ids)
        text = "".join(word(t) for t in request.resume_token_ids)
        emitted = len(request.resume_text)
        await asyncio.sleep(ttft_s)
        cut = _find_stop(text, s.stop) if s.stop and start else -1
        if start >= max_tokens or cut >= 0:
            # The previous node died just before saying it was done (or in its media).
            end = cut if cut >= 0 else len(text)
            yield Delta(
                text=text[emitted:end], prompt_tokens=prompt_tokens, completion_tokens=start
            )
            async for delta in self._media(request, prompt, start, prompt_tokens, aborted):
                yield delta
                if delta.finish_reason:
                    return
            yield Delta(
                finish_reason="stop" if cut >= 0 else "length",
                prompt_tokens=prompt_tokens,
                completion_tokens=start,
            )
            return
        for position in range(start, max_tokens):
            if aborted.set:
                yield Delta(
                    finish_reason="abort", prompt_tokens=prompt_tokens, completion_tokens=position
                )
                return
            if position > start:
                await self._next_step()
            if not self._healthy:
                raise EngineDead("simulated engine stopped mid-request")
            token = token_at(digest, s.seed or 0, position)
            self._generated_tokens += 1
            text += word(token)
            delta = Delta(
                token_ids=[token], prompt_tokens=prompt_tokens, completion_tokens=position + 1
            )
            end = len(text) - holdback
            cut = _find_stop(text, s.stop) if s.stop else -1
            if cut >= 0:
                end, delta.finish_reason = cut, "stop"
            elif position + 1 == max_tokens:
                end, delta.finish_reason = len(text), "length"
            if end > emitted:
                delta.text, emitted = text[emitted:end], end
            finish = delta.finish_reason
            if finish and any(m in request.modalities for m in MEDIA_MODALITIES):
                # The media items come after the text, before the finish.
                delta.finish_reason = None
                yield delta
                async for media in self._media(
                    request, prompt, position + 1, prompt_tokens, aborted
                ):
                    yield media
                    if media.finish_reason:
                        return
                yield Delta(
                    finish_reason=finish,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=position + 1,
                )
                return
            yield delta
            if finish:
                return

    async def _media(
        self,
        request: EngineRequest,
        prompt: str,
        completion_tokens: int,
        prompt_tokens: int,
        aborted: _Aborted,
    ) -> AsyncIterator[Delta]:
        """The media items of ``request`` after those already delivered, a piece per step."""
        wanted = [m for m in MEDIA_MODALITIES if m in request.modalities]
        if not wanted:
            return
        digest = media_digest(
            prompt,
            request.prompt_token_ids,
            seed=request.sampling.seed,
            inputs=request_media(request),
        )
        for index, modality in enumerate(wanted):
            if index < request.media_items_delivered:
                continue
            if modality == "audio":
                mime, data = "audio/wav", wav_bytes(digest, self.cfg.media_seconds)
            else:
                mime, data = "image/png", png_bytes(digest, self.cfg.image_size)
            for piece in media_pieces(index, mime, data):
                await self._next_step()
                if aborted.set:
                    yield Delta(
                        finish_reason="abort",
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                    )
                    return
                if not self._healthy:
                    raise EngineDead("simulated engine stopped mid-request")
                yield Delta(
                    outputs=[piece],
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                )
