"""Model-aware routing on real processes: a cluster whose agents serve two models, each request
served only by its model's nodes, aliases, and clear errors for an unknown or missing model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from node_agent.engines.sim import simulate
from omni_rpc import DistributedOrchestrator
from omni_rpc.cli.main import format_models
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk.client import CoordinatorClient, stats_dict
from omni_rpc.sdk.results import GenerationError
from tests.conftest import FAST_SIM

MakeCluster = Callable[..., LocalCluster]

MODELS = {
    0: ["--model", "sim-a"],
    1: ["--model", "sim-a"],
    2: ["--model", "sim-b", "--model-alias", "b"],
    3: ["--model", "sim-b", "--model-alias", "b"],
}
SERVED_BY = {
    "sim-a": {"node-0", "node-1"},
    "sim-b": {"node-2", "node-3"},
    "b": {"node-2", "node-3"},
}


async def test_two_models_in_one_cluster(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(4, agent_args=FAST_SIM, per_agent_args=MODELS)
    async with DistributedOrchestrator(coordinator=cluster.coordinator_address, timeout=30) as orch:

        async def one(model: str, i: int) -> None:
            prompt = f"{model} {i}"
            out = await orch.generate_one(prompt, model=model, max_tokens=8)
            assert set(out.nodes) <= SERVED_BY[model], (model, out.nodes)
            assert out.text == simulate(prompt, max_tokens=8).text

        await asyncio.gather(*(one(m, i) for m in SERVED_BY for i in range(8)))

        with pytest.raises(GenerationError) as unknown:
            await orch.generate_one("x", model="sim-c", max_tokens=4)
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        assert "model 'sim-c' is not served here; served: sim-a, sim-b" in unknown.value.message

        with pytest.raises(GenerationError) as missing:
            await orch.generate_one("x", max_tokens=4)
        assert missing.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "several models (sim-a, sim-b)" in missing.value.message

    client = CoordinatorClient(cluster.coordinator_address)
    try:
        stats = stats_dict(client.stats())
    finally:
        client.close()
    for node_id, model in (("node-0", "sim-a"), ("node-2", "sim-b")):
        assert stats["health_stats"][node_id]["model"] == model
    assert stats["health_stats"]["node-3"]["model_aliases"] == ["b"]
    # The simulated agents take and produce media by default (--sim-input-modalities,
    # --sim-output-modalities): listed with each model.
    media = "[in: text, audio, image, video; out: text, audio, image]"
    assert format_models(stats) == (
        f"models: sim-a {media} 2/2 healthy; sim-b (also b) {media} 2/2 healthy"
    )
