"""``make bench-ha``: a smoke run of ``scripts/bench_ha.py --quick`` (two coordinators over four
``sim`` agents, about 15 s) ends without errors, with a row for every strategy, and every agent
served requests in every run. No timing or balance is asserted here: the balance figure and its
tolerance live in docs/benchmarks.md, measured by the full benchmark."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


bench = load("bench_ha")


def test_quick_run_has_a_row_per_strategy_and_every_agent_served(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- bench:sim:start -->\nsim\n<!-- bench:sim:end -->\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_ha.py"), "--quick", "--out", str(doc)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    res = bench.previous_results(doc)
    assert res is not None and res.quick
    # Two coordinators for each strategy, and the one-coordinator reference.
    assert {(r.strategy, r.coordinators) for r in res.runs} == {
        ("least_loaded", 2),
        ("round_robin", 2),
        ("power_of_two", 2),
        ("least_loaded", 1),
    }
    for r in res.runs:
        assert r.errors == 0 and r.requests == res.workload["requests"], r
        assert len(r.agents) == bench.NUM_NODES, r
        assert all(a.served > 0 and a.tokens > 0 for a in r.agents), r
        assert sum(a.served for a in r.agents) == r.requests, r
        # With two coordinators each one sent its half, and the agents say where it went.
        assert sum(sum(a.by_coordinator) for a in r.agents) == r.requests, r
        assert all(len(a.by_coordinator) == r.coordinators for a in r.agents), r

    text = doc.read_text()
    # Its own section, after the others, which are kept; a table row per setup.
    assert text.startswith("# Benchmarks\n\n<!-- bench:sim:start -->\nsim\n<!-- bench:sim:end -->")
    assert text.count(bench.SECTION_START) == 1 and text.count(bench.SECTION_END) == 1
    assert bench.SECTION_TITLE in text and "not judged" in text
    for setup in bench.SETUPS:
        assert re.search(rf"\|\s+{re.escape(setup.label)} \|", text), setup.label
    for strategy in ("least_loaded", "round_robin", "power_of_two"):
        assert strategy in run.stdout
