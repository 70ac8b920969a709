"""``make bench-peers``: the mock OpenAI worker answers exactly what the ``sim`` engine
produces, the one HTTP load generator counts tokens alike whatever a server puts in a chunk, the
report writer updates its own section of the document only, and a smoke run of omni alone
(``--quick --only latency --systems omni``: HTTP front door, gRPC routed, agents direct) ends
with no errors. (Nothing here installs vllm-router.)"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from node_agent.engines.sim import SimConfig, SimEngine, simulate

pytest.importorskip("aiohttp")

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


worker = load("mock_openai_worker")
bench = load("bench_peers")

CASES: list[dict[str, Any]] = [
    {"prompt": "explain distributed inference over gRPC", "max_tokens": 12, "seed": 7},
    {"prompt": [5, 6, 7], "max_tokens": 5},
    # A stop string: the engine holds text back and cuts it, the stream must add up all the same.
    {"prompt": "stop early", "max_tokens": 40, "seed": 3, "stop": [" ba", " ke"]},
]


def events(raw: bytes) -> list[Any]:
    """The JSON payloads of an SSE body, ``"[DONE]"`` as that string."""
    out: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def check_stream(body: dict[str, Any], payloads: list[Any]) -> None:
    prompt = body["prompt"]
    expected = simulate(
        prompt if isinstance(prompt, str) else "",
        () if isinstance(prompt, str) else prompt,
        max_tokens=body["max_tokens"],
        seed=body.get("seed"),
        stop=body.get("stop", ()),
    )
    assert payloads[-1] == "[DONE]"
    usage = payloads[-2]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == len(expected.token_ids)
    assert usage["usage"]["prompt_tokens"] == expected.prompt_tokens
    chunks = payloads[:-2]
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    choices = [c["choices"][0] for c in chunks]
    assert "".join(c["text"] for c in choices) == expected.text
    assert [t for c in choices for t in c["token_ids"]] == expected.token_ids
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + [
        expected.finish_reason
    ]


@pytest.mark.parametrize("case", CASES)
async def test_sse_stream_is_the_sim_engines_output(case: dict[str, Any]) -> None:
    engine = SimEngine(SimConfig(ttft_ms=0.0, itl_ms=0.0))
    await engine.start()
    body = {
        **case,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    raw = b"".join([chunk async for chunk in worker.sse_events(engine, body, "sim", "cmpl-1")])
    check_stream(body, events(raw))


async def test_served_over_http() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    app = worker.build_app(SimConfig(ttft_ms=1.0, itl_ms=0.5, model="sim"))
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/health")).status == 200
        models = await (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == "sim"
        body = {**CASES[0], "stream": True, "return_token_ids": True}
        body["stream_options"] = {"include_usage": True}
        response = await client.post("/v1/completions", json=body)
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        check_stream(body, events(await response.read()))
        whole = await (await client.post("/v1/completions", json=CASES[0])).json()
        assert (
            whole["choices"][0]["text"] == simulate(CASES[0]["prompt"], max_tokens=12, seed=7).text
        )
        bad = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
        assert bad.status == 400


async def test_http_load_generator_counts_token_ids() -> None:
    """Against the mock worker (one chunk per token): every token, TTFT, messages."""
    from aiohttp.test_utils import TestServer

    app = worker.build_app(SimConfig(ttft_ms=0.0, itl_ms=0.0, model="sim"))
    async with TestServer(app) as server:
        call, close = bench.http_caller([str(server.make_url("/v1/completions"))], 12)
        rec = bench.Recorder(max_tokens=12, measuring=True)
        try:
            done = await call(3, rec)
        finally:
            await close()
    assert rec.tokens == 12 and done.messages == 12 and done.ttft_s > 0


async def test_http_load_generator_counts_several_tokens_per_chunk() -> None:
    """A server that puts several tokens in a chunk: counted by its token ids, or, where a
    chunk has none, one per chunk corrected to the usage; a usage that contradicts the ids and
    an error event fail the request."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    def body(ids: bool, usage: int, error: bool = False) -> bytes:
        events: list[Any] = []
        for k, n in enumerate((3, 4, 3)):
            choice: dict[str, Any] = {"index": 0, "text": " ab" * n, "finish_reason": None}
            if ids:
                choice["token_ids"] = list(range(n))
            if k == 2:
                choice["finish_reason"] = "length"
            events.append({"choices": [choice]})
        if error:
            events.insert(1, {"error": {"message": "engine on fire"}})
        events.append({"choices": [], "usage": {"completion_tokens": usage}})
        return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + (
            b"data: [DONE]\n\n"
        )

    replies = {
        "ids": body(True, 10),
        "text": body(False, 10),
        "lies": body(True, 11),
        "error": body(True, 10, error=True),
    }

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=replies[request.match_info["kind"]])

    app = web.Application()
    app.router.add_post("/{kind}/v1/completions", handler)
    async with TestServer(app) as server:
        for kind in replies:
            call, close = bench.http_caller([str(server.make_url(f"/{kind}/v1/completions"))], 10)
            rec = bench.Recorder(max_tokens=10, measuring=True)
            try:
                if kind in ("lies", "error"):
                    with pytest.raises(RuntimeError, match=r"usage says|engine on fire"):
                        await call(0, rec)
                    continue
                done = await call(0, rec)
            finally:
                await close()
            assert rec.tokens == 10 and done.messages == 3, kind


def rows(
    vr: tuple[float, float, float, float],
    om: tuple[float, float, float, float],
    oh: tuple[float, float, float, float] | None = None,
) -> list[Any]:
    """Rows for the paths: (tokens/s, streams/s, TTFT p50 ms, TTFT p99 ms) routed (omni over
    gRPC ``om``, over HTTP ``oh`` when given); direct paths get the same numbers with 0.3 ms
    less TTFT."""
    out = []
    for path, numbers in (
        ("vllm-router", vr),
        ("omni-http", oh),
        ("omni-routed", om),
        ("mock-direct", vr),
        ("omni-direct", om),
    ):
        if numbers is None:
            continue
        tok, streams, p50, p99 = numbers
        routed = path.endswith(("router", "routed", "http"))
        out.append(
            bench.Row(
                path=path,
                label=bench.PATH_LABELS[path],
                requests=100,
                tokens_per_s=tok,
                streams_per_s=streams,
                ttft_mean_ms=p50 if routed else p50 - 0.3,
                ttft_p50_ms=p50 if routed else p50 - 0.3,
                ttft_p99_ms=p99,
            )
        )
    return out


def results() -> Any:
    res = bench.Results(when="2026-01-01 00:00 UTC", command="scripts/bench_peers.py")
    res.rows["paced"] = rows((10000, 50, 25, 40), (9600, 48, 45, 90), (9000, 45, 60, 70))
    res.rows["latency"] = rows((5000, 300, 1.5, 2), (5000, 300, 1.9, 3))
    res.rows["throughput"] = rows((40000, 400, 10, 20), (20000, 200, 10, 20))
    res.idle = bench.IdleResult(128, 4, 60.0, 1, 3.2, 8.0, 5.0, [])
    return res


def test_targets_are_judged() -> None:
    verdicts = {
        (t.workload, t.what.split(" <=")[0].split(" >=")[0]): t.met
        for t in bench.targets(results())
    }
    assert verdicts[("paced", "omni gRPC tokens/s")] is True  # 0.96x
    assert verdicts[("paced", "omni gRPC TTFT p50")] is True  # 1.8x
    assert verdicts[("paced", "omni gRPC TTFT p99")] is False  # 2.25x
    assert verdicts[("paced", "omni HTTP tokens/s")] is False  # 0.9x
    assert verdicts[("paced", "omni HTTP TTFT p50")] is False  # 2.4x
    assert verdicts[("paced", "omni HTTP TTFT p99")] is True  # 1.75x
    assert verdicts[("latency", "omni added TTFT p50 (gRPC routed - direct)")] is True  # 0.3 ms
    assert verdicts[("throughput", "omni gRPC tokens/s")] is False  # 0.5x
    assert verdicts[("throughput", "omni HTTP tokens/s")] is None  # no HTTP row
    assert verdicts[("streams", "omni gRPC streams/s")] is None  # not run
    assert verdicts[("idle", "128 idle agents: coordinator CPU")] is True


def test_report_replaces_its_own_section_only(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\nintro\n\n<!-- bench:sim:start -->\nsim\n<!-- bench:sim:end -->\n"
    )
    bench.write_section(doc, results())
    first = doc.read_text()
    assert first.startswith("# Benchmarks\n\nintro\n\n<!-- bench:sim:start -->\nsim\n")
    assert bench.SECTION_TITLE in first and " NOT met |" in first
    assert "0.96x" in first
    # The summary: vllm-router HTTP, omni HTTP, omni gRPC, with the ratios to vllm-router.
    assert re.search(r"\|\s+paced \|\s+omni-rpc HTTP \|", first)
    assert "0.90x" in first and "2.40x" in first

    # A run of one workload keeps the others' last results.
    again = bench.Results(
        when="2026-01-02 00:00 UTC", command="scripts/bench_peers.py --only streams"
    )
    again.rows["streams"] = rows((0, 2000, 30, 60), (0, 1200, 50, 80))
    merged = bench.merge(bench.previous_results(doc), again, {"streams"})
    assert set(merged.rows) == {"paced", "latency", "throughput", "streams"}
    assert merged.idle is not None and merged.idle.coordinator_cpu == 3.2
    # A run without some paths (--systems omni) keeps their last rows, and says so.
    alone = bench.Results(when="2026-01-03 00:00 UTC", command="--systems omni --only paced")
    alone.rows["paced"] = [r for r in rows((0, 0, 0, 0), (1, 1, 1, 1)) if "omni" in r.path]
    kept = bench.merge(bench.previous_results(doc), alone, {"paced"})
    assert [r.path for r in kept.rows["paced"]] == list(bench.PATHS)
    assert kept.rows["paced"][0].tokens_per_s == 10000 and "omni-http" in bench.PATHS
    assert any("from the previous run" in n for n in kept.notes)
    bench.write_section(doc, merged)
    second = doc.read_text()
    assert second.count(bench.SECTION_START) == 1 and second.count(bench.SECTION_END) == 1
    assert "2026-01-02" in second and "2026-01-01" not in second
    assert "<!-- bench:sim:start -->\nsim\n<!-- bench:sim:end -->" in second


def test_cpu_of_a_process_tree() -> None:
    assert os.getpid() in bench.descendants(os.getpid())
    before = bench.tree_cpu([os.getpid()])
    sum(i * i for i in range(200_000))
    after = bench.tree_cpu([os.getpid()])
    assert bench.cpu_delta(before, after) >= 0.0
    assert bench.process_cpu_s(os.getpid()) > 0.0


def test_only_names_are_checked() -> None:
    assert bench.parse_only("latency, idle") == ["latency", "idle"]
    with pytest.raises(Exception, match="unknown workload"):
        bench.parse_only("latency,nope")
    assert bench.parse_systems("omni, vllm") == ["vllm", "omni"]
    with pytest.raises(Exception, match="unknown system"):
        bench.parse_systems("sglang")
    assert asyncio.iscoroutinefunction(bench.run_load)


def test_smoke_run_of_omni_over_http_and_grpc(tmp_path: Path) -> None:
    """``--quick --only latency --systems omni`` (about 15 s): the coordinator's HTTP front
    door, gRPC routed and the agents direct, each measured with no error and in the report."""
    doc = tmp_path / "benchmarks.md"
    argv = ["--quick", "--only", "latency", "--systems", "omni", "--out", str(doc)]
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_peers.py"), *argv],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = bench.previous_results(doc)
    assert res is not None and res.quick and res.systems == ["omni"]
    latency = {r.path: r for r in res.rows["latency"]}
    assert list(latency) == ["omni-http", "omni-routed", "omni-direct"], res.notes
    for row in latency.values():
        assert row.errors == 0 and row.requests > 0 and row.tokens_per_s > 0, row
        assert row.ttft_p50_ms > 0 and row.msgs_per_request >= 1
    text = doc.read_text()
    assert f"| {bench.PATH_LABELS['omni-http']} |" in text
    assert re.search(r"\|\s+latency \|\s+omni-rpc HTTP \|", text)
