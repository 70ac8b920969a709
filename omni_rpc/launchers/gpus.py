"""Which GPUs this machine offers, and which agent owns which: one agent per GPU.

Detection reads CUDA_VISIBLE_DEVICES when it is set (the launcher's own restriction wins),
otherwise asks ``nvidia-smi -L``; it never imports torch, which alone takes seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

# How `omni up --gpus` and DistributedOrchestrator(gpus=...) choose the agents' GPUs.
GPU_MODES = ("auto", "all", "none")


class PlacementError(ValueError):
    """The requested nodes do not fit the GPUs present."""


def visible_gpus() -> list[int]:
    """Indices this process may hand to agents (empty on a CPU host)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [d.strip() for d in env.split(",") if d.strip()]
        ids = ids[: ids.index("-1")] if "-1" in ids else ids
        # An agent's --gpu N becomes its CUDA_VISIBLE_DEVICES=N: physical indices pass
        # through; UUIDs cannot, so count them.
        return [int(d) for d in ids] if all(d.isdigit() for d in ids) else list(range(len(ids)))
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    return list(range(sum(line.startswith("GPU ") for line in done.stdout.splitlines())))


def parse_gpus(spec: str) -> str | list[int]:
    """``auto``, ``all``, ``none`` or a comma-separated list of GPU indices."""
    spec = spec.strip()
    if spec in GPU_MODES:
        return spec
    try:
        indices = [int(part) for part in spec.split(",")]
    except ValueError:
        raise PlacementError(
            f"gpus must be one of {', '.join(GPU_MODES)} or a list like 0,1,3; got {spec!r}"
        ) from None
    if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise PlacementError(f"gpus must be distinct indices >= 0; got {spec!r}")
    return indices


def assign(num_nodes: int, engine: str, gpus: str | Sequence[int] = "auto") -> list[int] | None:
    """The GPU of each agent, or None for CPU agents.

    ``auto`` puts vLLM agents one per detected GPU and leaves simulated agents on the CPU;
    ``all`` does the former for any engine (a simulated fleet shaped like the real one);
    ``none`` never assigns GPUs. A CPU host runs ``num_nodes`` CPU agents. More nodes than
    GPUs is refused: two engines on one GPU compete for its memory.
    """
    if isinstance(gpus, str):
        mode = parse_gpus(gpus)
        if mode == "none" or (mode == "auto" and engine != "vllm"):
            return None
        available = visible_gpus() if isinstance(mode, str) else mode
    else:
        available = list(gpus)
    if not available:
        return None
    if num_nodes > len(available):
        raise PlacementError(
            f"{num_nodes} nodes requested but this machine has {len(available)} GPU(s) "
            f"({', '.join(map(str, available))}): one agent per GPU; ask for at most "
            f"{len(available)} nodes, or place agents on several machines with Ray"
        )
    return list(available[:num_nodes])
