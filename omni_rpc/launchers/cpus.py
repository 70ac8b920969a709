"""Which CPU cores each local vLLM agent owns when there is no GPU: disjoint shares.

vLLM's CPU backend binds its OpenMP threads to cores (``VLLM_CPU_OMP_THREADS_BIND``); left to
itself, every engine on a host binds to the same cores, so a second agent adds no compute. The
local launcher splits the cores this process may use (``os.sched_getaffinity``) into one
contiguous group per agent and hands each its group (the agent's ``--cpu-cores LIST``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

# `omni up --cpu-cores` / DistributedOrchestrator(cpu_cores=...): split the cores between CPU
# vLLM agents, or leave vLLM's own binding (every agent on the same cores).
CPU_MODES = ("auto", "none")


def usable_cpus() -> list[int]:
    """The cores this process may run on, in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def split_cores(cores: Sequence[int], agents: int) -> list[list[int]]:
    """``agents`` groups of ``cores``: contiguous, disjoint, sizes differing by at most one
    (the first groups get the extra cores). With more agents than cores, each agent gets one
    core and agents share them (round robin), with a RuntimeWarning saying so."""
    if agents < 1:
        raise ValueError(f"agents must be >= 1, got {agents}")
    cores = list(cores)
    if not cores:
        raise ValueError("no cores to split")
    if agents > len(cores):
        warnings.warn(
            f"{agents} CPU vLLM agents on {len(cores)} core(s) ({format_cores(cores)}): agents "
            "share cores, so some add no compute; start at most one agent per core",
            RuntimeWarning,
            stacklevel=2,
        )
        return [[cores[index % len(cores)]] for index in range(agents)]
    size, extra = divmod(len(cores), agents)
    groups = []
    start = 0
    for index in range(agents):
        end = start + size + (1 if index < extra else 0)
        groups.append(cores[start:end])
        start = end
    return groups


def format_cores(cores: Sequence[int]) -> str:
    """The ``--cpu-cores`` syntax: ``[0, 1, 2, 3]`` is ``0-3``, ``[0, 2]`` is ``0,2``."""
    parts: list[str] = []
    ordered = sorted(set(cores))
    index = 0
    while index < len(ordered):
        end = index
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        first, last = ordered[index], ordered[end]
        if last == first:
            parts.append(str(first))
        elif last == first + 1:
            parts.append(f"{first},{last}")
        else:
            parts.append(f"{first}-{last}")
        index = end + 1
    return ",".join(parts)


def agent_core_lists(agents: int, cores: Sequence[int] | None = None) -> list[str]:
    """The ``--cpu-cores`` value of each of ``agents`` agents (this process's cores split)."""
    return [
        format_cores(group)
        for group in split_cores(usable_cpus() if cores is None else cores, agents)
    ]
