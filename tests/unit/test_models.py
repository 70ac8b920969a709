"""Model-aware routing (coordinator/registry.py, coordinator/dispatch.py): requests go only to
nodes serving the requested model (by name or alias); a model nobody serves is NOT_FOUND, no
model in a cluster serving several is INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest

from coordinator.registry import HEALTHY, Node, Registry
from omni_rpc.cli.main import format_models
from omni_rpc.sdk.client import node_dict
from omni_rpc.sdk.orchestrator import build_request
from omni_rpc.v1 import registry_pb2
from tests.unit.clock import VirtualClock
from tests.unit.fakes import FakeFleet, FakeNode
from tests.unit.test_dispatch import collect, dispatcher, request


def serve(registry: Registry, fleet: FakeFleet, node_id: str, model: str, *aliases: str) -> Node:
    fleet.add(FakeNode(node_id))
    node, _ = registry.join(
        registry_pb2.JoinRequest(
            node_id=node_id,
            address=f"{node_id}.test:1",
            engine="fake",
            capacity=4,
            model=model,
            model_aliases=list(aliases),
        )
    )
    registry.report_probe(node, True, False, "health check: SERVING")
    assert node.state == HEALTHY
    return node


def two_models(registry: Registry, fleet: FakeFleet) -> None:
    serve(registry, fleet, "a1", "model-a")
    serve(registry, fleet, "a2", "model-a")
    serve(registry, fleet, "b1", "model-b", "b", "bee")


def for_model(model: str, prompt: str = "p") -> object:
    r = request(prompt)
    r.model = model
    return r


async def test_each_request_is_served_by_its_models_nodes_only(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    two_models(registry, fleet)
    d = dispatcher(registry)
    for i in range(6):
        for model, nodes in (("model-a", {"a1", "a2"}), ("model-b", {"b1"}), ("bee", {"b1"})):
            responses = await collect(d.generate(for_model(model, f"p{i}"), None))  # type: ignore[arg-type]
            assert {r.node_id for r in responses} <= nodes, (model, responses[-1].node_id)
            assert responses[-1].finish_reason == "length"
    assert registry.models == ("model-a", "model-b")
    assert registry.model_names == {"model-a", "model-b", "b", "bee"}


async def test_an_unknown_model_is_not_found_naming_the_served_ones(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    from coordinator.dispatch import DispatchError

    two_models(registry, fleet)
    with pytest.raises(DispatchError) as raised:
        await collect(dispatcher(registry).generate(for_model("model-c"), None))  # type: ignore[arg-type]
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert raised.value.message == "model 'model-c' is not served here; served: model-a, model-b"


async def test_no_model_is_refused_when_several_are_served(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    from coordinator.dispatch import DispatchError

    two_models(registry, fleet)
    with pytest.raises(DispatchError) as raised:
        await collect(dispatcher(registry).generate(request(), None))
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "serves several models (model-a, model-b)" in raised.value.message


async def test_no_model_is_fine_when_one_is_served(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    serve(registry, fleet, "a1", "model-a", "alias")
    serve(registry, fleet, "a2", "model-a")
    d = dispatcher(registry)
    for r in (request(), for_model("model-a"), for_model("alias")):
        responses = await collect(d.generate(r, None))  # type: ignore[arg-type]
        assert responses[-1].finish_reason == "length"


async def test_a_model_whose_nodes_are_all_down_waits_then_is_unavailable(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    from coordinator.dispatch import DispatchError

    two_models(registry, fleet)
    b1 = registry.nodes["b1"]
    registry.report_unreachable(b1, "gone")
    with pytest.raises(DispatchError) as raised:
        await collect(dispatcher(registry, no_node_wait_s=2.0).generate(for_model("b"), None))  # type: ignore[arg-type]
    # Known, but no healthy node serves it: never routed to model-a's nodes.
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert registry.dispatchable("b") == ()
    assert {n.node_id for n in registry.dispatchable("model-a")} == {"a1", "a2"}


async def test_a_removed_nodes_model_is_no_longer_served(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    two_models(registry, fleet)
    registry.leave("b1", "bye")
    assert registry.models == ("model-a",)
    assert "b" not in registry.model_names


def test_sdk_requests_name_their_model() -> None:
    assert build_request("hi", None, {"model": "m", "max_tokens": 3}).model == "m"
    assert build_request("hi", None, {"max_tokens": 3}).model == ""
    with pytest.raises(TypeError, match="known: model, max_tokens"):
        build_request("hi", None, {"modle": "m"})


async def test_status_lists_models_with_their_healthy_nodes(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    two_models(registry, fleet)
    registry.report_unreachable(registry.nodes["a2"], "gone")
    stats = {"health_stats": {n.node_id: node_dict(n.to_proto()) for n in registry.nodes.values()}}
    assert format_models(stats) == (
        "models: model-a 1/2 healthy; model-b (also b, bee) 1/1 healthy"
    )


async def test_a_node_never_healthy_adds_no_model(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    """A join that never answers as a node (a wrong address, a typo) must not make the cluster
    "serve several models" and refuse every request that names none."""
    serve(registry, fleet, "a1", "model-a")
    registry.join(registry_pb2.JoinRequest(node_id="junk", address="nowhere:1", model="other"))
    registry.join(registry_pb2.JoinRequest(node_id="blank", address="nowhere:2"))
    assert registry.models == ("model-a",)
    responses = await collect(dispatcher(registry).generate(request(), None))
    assert responses[-1].finish_reason == "length"
