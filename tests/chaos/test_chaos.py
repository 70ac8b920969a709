"""Bounded chaos runs: a real cluster under load while a seeded fault driver breaks its nodes.

Each seed runs at least 1000 requests at concurrency 32 against a coordinator and 4 simulated
agents (separate processes) while agents are killed and restarted, frozen and thawed, and their
engines die or fail every request. Every request must end with exactly the simulated engine's
output: nothing lost, duplicated or reordered. Each seed runs with a one-process coordinator
and with ``--workers 2`` (a control process and two workers). About 12 s per run on a 2-CPU
machine;
``tests/chaos/harness.py`` has the details and ``make chaos`` runs a longer one. ``pytest -s``
shows each run's report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import KINDS, ChaosConfig, run_chaos

REQUESTS = 1000
CONCURRENCY = 32


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
    assert all(report.fault_counts()[kind] >= 1 for kind in KINDS), report.fault_counts()
    assert report.failures() == [], why
