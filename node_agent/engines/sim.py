"""The simulated engine: vLLM's behaviour without a GPU, for tests, benchmarks and planning.

Output is a pure function, so a test can compute what any request must return:

* The prompt key is the prompt text (UTF-8) or, for token-id prompts, the ids joined by
  commas; ``seed`` defaults to 0.
* A chat (``messages``) is first rendered to a text prompt by the simulated model's chat
  template (``render_chat``): ``<|ROLE|>`` + newline + the content + newline for each turn, in
  order, then ``<|assistant|>`` + newline (the assistant's turn opened). From there on it is
  that prompt: same output, same ``prompt_tokens``.
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
first token ``ttft_ms`` and an inter-token latency of ``itl_ms * (1 + itl_growth * (running -
1))``, so a busier engine is slower, as a batching engine is. Like vLLM, it runs in steps: every
running request past its first token advances one token at the end of the engine's current
step, so the requests' outputs come out together, once per step, as vLLM's do (and a node agent
sends them in one message). At most ``max_concurrency`` requests run; the rest wait in FIFO
order.

Fault injection (``set_fault``, or ``--sim-fault`` and SIGUSR1/SIGUSR2 in the agent):
``dead`` stops the engine (health turns false, running requests fail at their next token,
new ones are refused) until the mode is set back to ``none``; ``fail_requests`` keeps the
engine healthy but fails every request, as a broken GPU that still answers health checks would.
"""

from __future__ import annotations

import asyncio
import hashlib
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


def _prompt_digest(prompt: str, prompt_token_ids: Sequence[int]) -> bytes:
    key = prompt.encode() if prompt else ",".join(map(str, prompt_token_ids)).encode()
    return hashlib.blake2b(key).digest()


def token_at(digest: bytes, seed: int, position: int) -> int:
    material = digest + seed.to_bytes(8, "big", signed=True) + position.to_bytes(8, "big")
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big") % VOCAB_SIZE


def prompt_token_count(prompt: str, prompt_token_ids: Sequence[int]) -> int:
    return len(prompt_token_ids) if prompt_token_ids else max(1, len(prompt.split()))


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
) -> Completion:
    """The complete output the simulated engine produces for a request (a chat: ``messages``)."""
    if messages:
        prompt = render_chat(messages)
    digest = _prompt_digest(prompt, prompt_token_ids)
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
                async for delta in self._stream(request, prompt, max_tokens, flag):
                    if delta.finish_reason is not None:
                        outcome = "aborted" if delta.finish_reason == "abort" else "finished"
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
        self, request: EngineRequest, prompt: str, max_tokens: int, aborted: _Aborted
    ) -> AsyncIterator[Delta]:
        s = request.sampling
        digest = _prompt_digest(prompt, request.prompt_token_ids)
        prompt_tokens = prompt_token_count(prompt, request.prompt_token_ids)
        # Text that could still turn out to be the start of a stop string is held back, as
        # vLLM does, so the streamed text always adds up to the final text.
        holdback = max((len(x) for x in s.stop), default=1) - 1
        start = len(request.resume_token_ids)
        text = "".join(word(t) for t in request.resume_token_ids)
        emitted = len(request.resume_text)
        await asyncio.sleep(self.cfg.ttft_ms / 1000.0)
        if start >= max_tokens:  # the previous node died just before saying it was done
            yield Delta(
                text=text[emitted:],
                finish_reason="length",
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
            yield delta
            if delta.finish_reason:
                return
