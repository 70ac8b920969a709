"""Bounded chaos runs: a real cluster under load while a seeded fault driver breaks its nodes.

Each seed runs at least 1000 requests at concurrency 32 against a coordinator and 4 simulated
agents (separate processes) while agents are killed and restarted, frozen and thawed, and their
engines die or fail every request. Every request must end with exactly the simulated engine's
output: nothing lost, duplicated or reordered. Each seed runs with a one-process coordinator
and with ``--workers 2`` (a control process and two workers). About 12 s per run on a 2-CPU
machine. With two coordinators (the SDK holding both addresses), coordinators are killed,
frozen and restarted too, one at a time, alongside the agent faults: streams on the broken one
go on through the other exactly once (about 20 s per run).
``tests/chaos/harness.py`` has the details and ``make chaos`` runs a longer one. ``pytest -s``
shows each run's report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import COORDINATOR_KINDS, KINDS, ChaosConfig, ChaosReport, run_chaos

REQUESTS = 1000
CONCURRENCY = 32


def check(report: ChaosReport, kinds: tuple[str, ...]) -> None:
    print()
    print(report.summary())
    # At least REQUESTS: the load goes on until one fault of each kind has been repaired.
    assert len(report.records) >= REQUESTS
    counts = {
        "lost": report.lost,
        "duplicated": report.duplicated,
        "reordered": report.reordered,
        "corrupt": report.corrupt,
    }
    why = "\n".join(report.failures())
    assert counts == dict.fromkeys(counts, 0), why
    assert all(report.fault_counts()[kind] >= 1 for kind in kinds), report.fault_counts()
    assert report.failures() == [], why


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chaos_no_request_lost_or_duplicated(seed: int, workers: int, tmp_path: Path) -> None:
    report = run_chaos(
        seed,
        REQUESTS,
        CONCURRENCY,
        nodes=4,
        log_dir=tmp_path / "logs",
        cfg=ChaosConfig(workers=workers),
    )
    check(report, KINDS)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_chaos_with_coordinator_faults(seed: int, tmp_path: Path) -> None:
    """Two coordinators: coordinator faults (killed, frozen, restarted) lose nothing."""
    report = run_chaos(
        seed,
        REQUESTS,
        CONCURRENCY,
        nodes=4,
        log_dir=tmp_path / "logs",
        cfg=ChaosConfig(coordinators=2),
    )
    check(report, KINDS + COORDINATOR_KINDS)
    # The first round's coordinator faults (the load goes on until it is over) met streams in
    # flight, and the streams of a killed or frozen coordinator went on through the other.
    first = [f for f in report.faults[: len(report.cfg.kinds)] if f.on_coordinator]
    assert {f.kind for f in first} == set(COORDINATOR_KINDS)
    assert all(f.in_flight > 0 for f in first), [(f.kind, f.in_flight) for f in first]
    moved = {f.kind: f.moved for f in first}
    assert moved["coordinator_kill"] > 0 and moved["coordinator_stop"] > 0, moved
