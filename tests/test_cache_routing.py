"""Cache-aware and consistent-hash routing on real processes: simulated agents with a prefix
cache, a coordinator routing by prefix or by affinity key, cached tokens in usage, and the
cluster's hit rate in the coordinator's metrics."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk import DistributedOrchestrator
from omni_rpc.sdk.client import CoordinatorClient
from tests.conftest import wait_until
from tests.test_metrics import Samples, scrape, value

MakeCluster = Callable[..., LocalCluster]

CACHE_SIM = [
    *("--sim-ttft-ms", "2", "--sim-itl-ms", "2"),
    *("--sim-prefix-cache-tokens", "4096", "--sim-prefill-us-per-token", "20"),
]


def system_prompt(tenant: int) -> str:
    return " ".join(f"tenant{tenant}-rule{i}" for i in range(200))


async def test_each_tenant_prefix_is_served_where_it_is_cached(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    metrics_file = tmp_path / "coordinator.metrics"
    cluster = make_cluster(
        3,
        strategy="cache_aware",
        agent_args=CACHE_SIM,
        coordinator_args=["--metrics-port", "0", "--metrics-port-file", str(metrics_file)],
    )
    nodes = CoordinatorClient(cluster.coordinator_address).nodes()
    assert {(n.cache_block_tokens, n.cache_capacity_tokens) for n in nodes} == {(16, 4096)}
    orch = DistributedOrchestrator(coordinator=cluster.coordinator_address, timeout=30)
    served: dict[int, set[str]] = collections.defaultdict(set)
    cached = prompt = 0
    # One request at a time: the balance thresholds never come into play.
    for question in range(5):
        for tenant in range(6):
            result = await orch.chat(
                [
                    {"role": "system", "content": system_prompt(tenant)},
                    {"role": "user", "content": f"question {question}"},
                ],
                max_tokens=4,
            )
            served[tenant].add(result.node_id)
            cached += result.usage["cached_prompt_tokens"]
            prompt += result.usage["prompt_tokens"]
            if question:
                # The system prompt's whole blocks were computed on this node before.
                assert result.usage["cached_prompt_tokens"] >= 192
    assert all(len(nodes) == 1 for nodes in served.values()), served
    # The tenants are spread, not piled on one node.
    assert len({next(iter(n)) for n in served.values()}) == 3
    # Each tenant's system prompt computed once: the rest was found in the cache.
    assert cached / prompt > 0.7

    def caught_up() -> Samples | None:
        # The agents' counters reach the coordinator with their load reports: wait until every
        # prompt token above is counted, or the rate is read from a partial report.
        samples = scrape(metrics_file)
        counted = sum(
            v for (name, _), v in samples.items() if name == "omni_node_prompt_tokens_total"
        )
        return samples if counted >= prompt else None

    samples = wait_until(caught_up, 10.0, "the agents' prompt tokens in the coordinator's metrics")
    rate = value(samples, "omni_prefix_cache_hit_rate")
    assert abs(rate - cached / prompt) < 0.1  # the agents' counters (whole prompts, resumes)
    await orch.aclose()


async def test_round_robin_computes_each_prefix_on_every_node(make_cluster: MakeCluster) -> None:
    """The baseline cache_aware improves on: the same workload spread blindly."""
    cluster = make_cluster(3, strategy="round_robin", agent_args=CACHE_SIM)
    orch = DistributedOrchestrator(coordinator=cluster.coordinator_address, timeout=30)
    served: dict[int, set[str]] = collections.defaultdict(set)
    for question in range(3):
        for tenant in range(2):
            result = await orch.chat(
                [
                    {"role": "system", "content": system_prompt(tenant)},
                    {"role": "user", "content": f"question {question}"},
                ],
                max_tokens=4,
            )
            served[tenant].add(result.node_id)
    assert all(len(nodes) == 3 for nodes in served.values()), served
    await orch.aclose()


async def test_sessions_stick_to_their_node_under_consistent_hash(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(3, strategy="consistent_hash")
    orch = DistributedOrchestrator(coordinator=cluster.coordinator_address, timeout=30)
    homes: dict[str, set[str]] = collections.defaultdict(set)
    for turn in range(4):
        for user in range(9):
            result = await orch.generate_one(
                f"turn {turn}", max_tokens=2, affinity_key=f"user-{user}"
            )
            homes[f"user-{user}"].add(result.node_id)
    assert all(len(nodes) == 1 for nodes in homes.values()), homes
    assert len({next(iter(n)) for n in homes.values()}) > 1
    await orch.aclose()
