"""``make bench-cache``: a smoke run of ``scripts/bench_cache.py --quick --no-doc`` (the simulated
part only, four ``sim`` agents with a prefix cache, 32 chat turns per strategy, about 15 s) ends
without errors, with a row for every strategy, and ``cache_aware`` finds some of its prompts in
the caches. No timing, hit rate or balance target is asserted here: those live in
docs/benchmarks.md, measured by the full benchmark."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    # bench_cache imports bench_ha's helpers, as it does when run as a script.
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


bench = load("bench_cache")


def test_quick_run_has_a_row_per_strategy_and_cache_aware_hits(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- bench:ha:start -->\nha\n<!-- bench:ha:end -->\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_cache.py"), "--quick", "--no-doc"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    # One row per strategy in the printed table: agents, strategy, runs, errors, ...
    rows = {
        m[1]: m for m in re.finditer(r"^\|\s+4 \|\s+(\w+) \|\s+1 \|\s+(\d+) \|(.*)$", out, re.M)
    }
    assert set(rows) == set(bench.STRATEGIES), out[-3000:]
    assert all(m[2] == "0" for m in rows.values()), out[-3000:]
    # Per run: every request answered, and cache_aware found prompt tokens in the caches.
    lines = {
        s: next(line for line in out.splitlines() if f" {s} " in line and "n=" in line)
        for s in bench.STRATEGIES
    }
    requests = bench.SIM_QUICK.requests
    for line in lines.values():
        assert f"n={requests} err=0" in line, line
    hit = re.search(r"hit\s+([\d.]+)%", lines["cache_aware"])
    assert hit is not None and float(hit[1]) > 0, lines["cache_aware"]
    assert "not judged" in out
    # --no-doc: nothing written.
    assert doc.read_text().count("bench:cache") == 0


def test_section_renders_between_its_markers_and_keeps_the_rest(tmp_path: Path) -> None:
    """The report of a (made-up) result goes between the markers, after the other sections,
    with its data comment, and reads back."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- bench:ha:start -->\nha\n<!-- bench:ha:end -->\n")
    run = bench.SimRun(
        agents=4,
        strategy="cache_aware",
        round=1,
        requests=10,
        prompt_tokens=1000,
        cached_tokens=800,
        ideal_cached_tokens=850,
        served=[3, 3, 2, 2],
        concurrency=[1.0, 1.0, 1.0, 1.0],
    )
    part = bench.SimPart(quick=True, workload=bench.asdict(bench.SIM_QUICK), agents=[4], runs=[run])
    res = bench.Results(command="scripts/bench_cache.py --quick", sim=part)
    bench.write_section(doc, res)
    bench.write_section(doc, res)  # replaces, never appends a second copy
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\n<!-- bench:ha:start -->\nha\n<!-- bench:ha:end -->")
    assert text.count(bench.SECTION_START) == 1 and text.count(bench.SECTION_END) == 1
    assert bench.SECTION_TITLE in text and "cannot front the same workers" in text
    assert re.search(r"\|\s+4 \|\s+cache_aware \|", text)
    back = bench.previous_results(doc)
    assert back is not None and back.sim is not None and back.vllm is None
    assert back.sim.runs[0].hit_rate == 0.8 and back.sim.runs[0].served == [3, 3, 2, 2]
