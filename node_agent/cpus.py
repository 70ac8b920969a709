"""CPU core binding of one agent (``--cpu-cores``): several CPU agents on one host each get
their own cores.

Without it, vLLM's CPU worker binds its OpenMP threads itself ("auto": the allowed cores of
the first NUMA node, minus one it reserves), so every agent on a host picks the same cores
(on two cores: all of them on core 0). ``--cpu-cores 0-3`` (or ``0,2``, ``1``, ``0-1,4``)
gives the agent exactly these cores: the agent process and its threads are restricted to them
(``pin``), which the engine processes it starts inherit, and the vLLM engine binds its OpenMP
threads to them (``VLLM_CPU_OMP_THREADS_BIND``, set by ``node_agent/engines/vllm.py``).
"""

from __future__ import annotations

import argparse
import os

from omni_rpc.logging import get_logger

log = get_logger("node_agent.cpus")


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``0-3``, ``0,2``, ``1``, ``0-1,4`` as sorted, distinct core ids; ValueError otherwise."""
    cores: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"expected core ids and ranges such as 0-3 or 0,2 or 1, got {text!r}")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"range {part!r} ends before it starts (in {text!r})")
        cores.update(range(low, high + 1))
    return tuple(sorted(cores))


def cpu_list(text: str) -> tuple[int, ...]:
    """argparse type of ``--cpu-cores``: a bad list exits 2 naming it."""
    try:
        return parse_cpu_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_cpu_list(cores: tuple[int, ...]) -> str:
    """Cores as a compact list: ``0-3,6``."""
    runs: list[str] = []
    start = prev = -2
    for core in [*sorted(cores), -2]:
        if core == prev + 1:
            prev = core
            continue
        if start >= 0:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = core
    return ",".join(runs)


def allowed_cores() -> set[int]:
    """The cores this process may run on (its affinity mask)."""
    return set(os.sched_getaffinity(0))


def check(cores: tuple[int, ...], allowed: set[int] | None = None) -> tuple[int, ...]:
    """``cores`` if this process may use every one of them, else ValueError naming the rest."""
    allowed = allowed_cores() if allowed is None else allowed
    outside = [c for c in cores if c not in allowed]
    if outside:
        raise ValueError(
            f"--cpu-cores {format_cpu_list(cores)}: core(s) {format_cpu_list(tuple(outside))} "
            f"not available to this process (allowed: {format_cpu_list(tuple(sorted(allowed)))})"
        )
    return cores


def pin(cores: tuple[int, ...]) -> None:
    """Restrict this process, every thread it has now and every one it starts later (and its
    children), to ``cores``."""
    mask = set(cores)
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for thread in threads:
        try:
            os.sched_setaffinity(thread, mask)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    log.info("agent bound to cores", cpu_cores=format_cpu_list(cores))
