"""The GPU an agent owns: pin the engine to it and describe it to the coordinator.

The description (name, memory) comes from ``nvidia-smi``, asked once at start-up without
importing torch (seconds of start-up) and before the engine exists. On a host without
nvidia-smi, or for an agent that owns no GPU, name and memory stay empty: a CPU agent.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from omni_rpc.logging import get_logger
from omni_rpc.v1 import node_pb2

log = get_logger("node_agent.gpu")

NVIDIA_SMI_TIMEOUT_S = 10.0


def describe(index: int) -> tuple[str, int]:
    """(name, memory in bytes) of physical GPU ``index`` per nvidia-smi; ("", 0) if unknown."""
    smi = shutil.which("nvidia-smi")
    if index < 0 or smi is None:
        return "", 0
    query = [
        smi,
        "--query-gpu=name,memory.total",
        "--format=csv,noheader,nounits",
        "-i",
        str(index),
    ]
    try:
        done = subprocess.run(
            query, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True
        )
        name, memory_mib = (part.strip() for part in done.stdout.strip().split(",", 1))
        return name, int(float(memory_mib)) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        # The agent still serves; the operator sees the GPU without its name and size.
        log.warning("could not describe the GPU with nvidia-smi", gpu=index, error=str(exc))
        return "", 0


def own_gpu(gpu: int) -> node_pb2.GpuInfo:
    """Make the engine see exactly GPU ``gpu`` (if given) and describe what it sees.

    Runs before torch or vLLM is imported, which read CUDA_VISIBLE_DEVICES once. Without
    ``--gpu`` the environment's value stands: Ray and Kubernetes' device plugin set it.
    """
    if gpu >= 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    index = gpu if gpu >= 0 else (int(visible) if visible.strip().isdigit() else -1)
    name, memory_bytes = describe(index)
    return node_pb2.GpuInfo(
        index=index, name=name, memory_bytes=memory_bytes, visible_devices=visible
    )
