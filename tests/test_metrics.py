"""Prometheus metrics of the coordinator and an agent, scraped after real traffic."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from omni_rpc import DistributedOrchestrator, GenerationError
from omni_rpc.launchers.local import LocalCluster
from tests.conftest import wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port_file: Path) -> Samples:
    port = int(port_file.read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_with_traffic_and_failures(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    coordinator_file, agent_file = tmp_path / "coordinator.metrics", tmp_path / "agent.metrics"
    cluster = make_cluster(
        2,
        strategy="round_robin",
        coordinator_args=["--metrics-port", "0", "--metrics-port-file", str(coordinator_file)],
        per_agent_args={0: ["--metrics-port", "0", "--metrics-port-file", str(agent_file)]},
    )
    orch = DistributedOrchestrator(coordinator=cluster.coordinator_address, timeout=30)
    before = scrape(coordinator_file)
    assert value(before, "omni_requests_total", status="OK") == 0
    assert value(before, "omni_node_state", node_id="node-0", state="healthy") == 1

    results = await orch.generate([f"metrics {i}" for i in range(6)], max_tokens=8)
    try:
        await orch.generate([""], max_tokens=8)
    except GenerationError:
        pass
    after = scrape(coordinator_file)
    assert value(after, "omni_requests_total", status="OK") == 6
    assert value(after, "omni_requests_total", status="INVALID_ARGUMENT") == 1
    assert value(after, "omni_generated_tokens_total") == 48
    assert value(after, "omni_time_to_first_token_seconds_count") == 6
    assert value(after, "omni_request_duration_seconds_count") == 6
    assert value(after, "omni_health_probe_duration_seconds_count") >= 2
    assert value(after, "omni_node_in_flight", node_id="node-1") == 0

    agent = scrape(agent_file)
    served_by_0 = sum(r.node_id == "node-0" for r in results)
    assert value(agent, "omni_engine_requests_total", outcome="finished") == served_by_0
    assert value(agent, "omni_engine_generated_tokens_total") == 8 * served_by_0
    assert value(agent, "omni_agent_in_flight") == 0

    # node-1 starts failing every request: failovers, retries, then a circuit-breaker ejection.
    os.kill(cluster.agents[1].process.pid, signal.SIGUSR2)
    for i in range(12):
        await orch.generate_one(f"failing {i}", max_tokens=4)
    wait_until(
        lambda: value(scrape(coordinator_file), "omni_ejections_total", node_id="node-1") == 1,
        10.0,
        "node-1's ejection to be counted",
    )
    final = scrape(coordinator_file)
    assert value(final, "omni_failovers_total") >= 5
    assert value(final, "omni_retries_total") >= value(final, "omni_failovers_total")
    assert value(final, "omni_node_state", node_id="node-1", state="unhealthy") == 1
    assert value(final, "omni_node_state", node_id="node-1", state="healthy") == 0
    assert value(final, "omni_requests_total", status="OK") == 18
    await orch.aclose()


async def test_request_logs_carry_ids_and_no_prompt_unless_asked(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    for log_prompts in (False, True):
        cluster = make_cluster(1, coordinator_args=["--log-prompts"] if log_prompts else [])
        orch = DistributedOrchestrator(coordinator=cluster.coordinator_address, timeout=30)
        result = await orch.generate_one("a very private prompt", max_tokens=4)
        await orch.aclose()
        assert cluster.coordinator is not None

        def finished_line(path: Path = cluster.coordinator.log_path) -> dict[str, object] | None:
            for line in path.read_text().splitlines():
                if line.startswith("{"):
                    entry = json.loads(line)
                    if entry.get("event") == "request finished":
                        return dict(entry)
            return None

        entry = wait_until(finished_line, 10.0, "the request's log line")
        assert entry["request_id"] == result.request_id and entry["node_id"] == "node-0"
        assert entry["status"] == "OK" and entry["level"] == "info"
        text = cluster.coordinator.log_path.read_text()
        assert ("a very private prompt" in text) is log_prompts
