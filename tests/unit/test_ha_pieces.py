"""The pieces of running several coordinators, in process: coordinator address forms, the
client's resume point and its checks, and the agent joining every address a name has."""

from __future__ import annotations

import asyncio
import json

import pytest

from coordinator.registry import Registry
from node_agent import coordinators as agent_coordinators
from node_agent.coordinators import Coordinators
from omni_rpc import targets
from omni_rpc.sdk.orchestrator import Received
from omni_rpc.v1 import generate_pb2, node_pb2, registry_pb2
from omni_rpc.validation import InvalidRequest, validate_request
from tests.unit.fakes import FakeFleet, FakeNode, join_request

# -- address forms -------------------------------------------------------------------------------


def test_one_address_is_dialed_as_given_with_grpc_defaults() -> None:
    assert targets.client_channel_target("coord.example:50051") == ("coord.example:50051", [])


def test_a_list_becomes_one_round_robin_channel_over_its_addresses() -> None:
    target, options = targets.client_channel_target(["127.0.0.1:1", "localhost:2"])
    assert target == "ipv4:127.0.0.1:1,127.0.0.1:2"
    config = json.loads(dict(options)["grpc.service_config"])
    assert config == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert targets.client_channel_target("[::1]:1,[::1]:2")[0] == "ipv6:[::1]:1,[::1]:2"


def test_a_dns_name_stands_for_every_address_it_has() -> None:
    target, options = targets.client_channel_target("dns:///peers.svc:50051")
    assert target == "dns:///peers.svc:50051" and options == targets.ROUND_ROBIN_OPTIONS
    (parsed,) = targets.parse_targets("dns:///peers.svc:50051")
    assert parsed.every_address and parsed.host == "peers.svc" and parsed.port == 50051


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("", "no coordinator address"),
        ("coord", "expected HOST:PORT"),
        ("coord:0", "expected HOST:PORT"),
        ("coord:99999", "expected HOST:PORT"),
        ("http://coord:80", "the only scheme is dns:///"),
        ("dns://8.8.8.8/coord:1", "the only scheme is dns:///"),
        ("127.0.0.1:1,[::1]:2", "mix IPv4 and IPv6"),
        ("dns:///a:1,b:2", "give it alone"),
        ("no-such-host.invalid:1,127.0.0.1:2", "does not resolve"),
    ],
)
def test_malformed_addresses_are_refused_naming_the_problem(given: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        targets.client_channel_target(given)


async def test_an_agent_joins_each_address_of_a_name_once() -> None:
    """localhost has an IPv4 and an IPv6 address: one coordinator, joined once (IPv4)."""
    target = targets.parse_targets("localhost:50051")[0]
    assert await targets.resolve_every_address(target) == ["127.0.0.1:50051"]
    assert targets.every_coordinator("localhost:1,127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert targets._one_family(["10.0.0.2", "fd00::1", "10.0.0.1", "10.0.0.2"]) == [
        "10.0.0.1",
        "10.0.0.2",
    ]
    assert targets._one_family(["fd00::2", "fd00::1"]) == ["fd00::1", "fd00::2"]


def test_duplicates_are_dropped_and_the_order_kept() -> None:
    assert targets.describe_checked("b:2, a:1,b:2") == "b:2,a:1"


# -- the client's resume point -------------------------------------------------------------------


def generate(**resume: object) -> generate_pb2.GenerateRequest:
    """A request for 8 tokens with the resume point ``resume``."""
    request = generate_pb2.GenerateRequest(prompt="hello")
    request.sampling.max_tokens = 8
    request.resume.CopyFrom(generate_pb2.Resume(**resume))  # type: ignore[arg-type]
    return request


def test_a_resume_point_the_stream_could_have_reached_is_accepted() -> None:
    validate_request(generate(token_ids=[1, 2, 3], text="a b c"))
    validate_request(generate(token_ids=[1] * 7))


@pytest.mark.parametrize(
    ("resume", "field", "problem"),
    [
        ({"token_ids": [1, -2]}, "resume.token_ids", ">= 0"),
        ({"text": "some text"}, "resume.text", "give both"),
        ({"token_ids": [1] * 8}, "resume.token_ids", "nothing is left"),
        (
            {"token_ids": [1], "media_items_delivered": 1},
            "resume.media_items_delivered",
            "no media",
        ),
        ({"token_ids": [1], "media_items_delivered": -1}, "resume.media_items_delivered", ">= 0"),
    ],
)
def test_impossible_resume_points_are_invalid(
    resume: dict[str, object], field: str, problem: str
) -> None:
    with pytest.raises(InvalidRequest, match=problem) as caught:
        validate_request(generate(**resume))
    assert caught.value.field == field


def test_with_media_outputs_every_token_may_be_out_before_the_items() -> None:
    request = generate(token_ids=[1] * 8, media_items_delivered=1)
    request.modalities.extend(["text", "audio"])
    validate_request(request)


def test_the_sdk_resumes_after_everything_received_under_the_same_request_id() -> None:
    request = generate_pb2.GenerateRequest(prompt="hello")
    received = Received(request)
    assert not received.any
    received.add(generate_pb2.GenerateResponse(request_id="r-9", text=" a", token_ids=[4]))
    received.add(
        generate_pb2.GenerateResponse(
            request_id="r-9",
            text=" b",
            token_ids=[5, 6],
            outputs=[generate_pb2.Media(index=0, last_chunk=True), generate_pb2.Media(index=1)],
        )
    )
    received.resume(request)
    assert request.request_id == "r-9"  # the coordinator named it: the continuation keeps it
    assert list(request.resume.token_ids) == [4, 5, 6]
    assert request.resume.text == " a b"
    assert request.resume.media_items_delivered == 1  # item 1 is partial: produced again
    # A second continuation counts from the first one's point.
    again = Received(request)
    again.add(generate_pb2.GenerateResponse(request_id="r-9", text=" c", token_ids=[7]))
    again.resume(request)
    assert list(request.resume.token_ids) == [4, 5, 6, 7] and request.resume.text == " a b c"


# -- the agent joins every coordinator -----------------------------------------------------------


class FakeMembership:
    """Stands in for one coordinator membership (no network)."""

    # Set whenever a membership joins (tests wait on it).
    joins: asyncio.Event

    def __init__(self, address: str, *_: object) -> None:
        self.address = address
        self.joined = asyncio.Event()
        self.closed = False

    async def run(self) -> None:
        self.joined.set()
        FakeMembership.joins.set()
        await asyncio.Event().wait()

    async def leave(self, reason: str) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


async def joins() -> None:
    await FakeMembership.joins.wait()
    FakeMembership.joins.clear()


async def test_the_agent_follows_the_addresses_of_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator that appears is joined, one whose address is gone is let go, and a name
    that fails to resolve keeps the coordinators known."""
    answers: list[list[str] | OSError] = [
        ["10.0.0.1:50051", "10.0.0.2:50051"],
        OSError("temporary failure in name resolution"),
        ["10.0.0.2:50051", "10.0.0.3:50051"],
    ]
    resolved = asyncio.Event()

    async def resolve(target: targets.CoordinatorTarget) -> list[str]:
        answer = answers.pop(0) if answers else ["10.0.0.2:50051", "10.0.0.3:50051"]
        if not answers:
            resolved.set()
        if isinstance(answer, OSError):
            raise answer
        return answer

    monkeypatch.setattr(targets, "resolve_every_address", resolve)
    monkeypatch.setattr(agent_coordinators, "Membership", FakeMembership)
    FakeMembership.joins = asyncio.Event()
    agent = Coordinators(
        "dns:///peers.svc:50051", registry_pb2.JoinRequest(node_id="n"), resolve_interval_s=0.01
    )
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(5):
            await resolved.wait()
            while sorted(agent.joined) != ["10.0.0.2:50051", "10.0.0.3:50051"]:
                await joins()
        assert sorted(agent.memberships) == ["10.0.0.2:50051", "10.0.0.3:50051"]
    finally:
        task.cancel()
        await agent.close()


async def test_a_fixed_list_is_joined_once_each_without_resolving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(agent_coordinators, "Membership", FakeMembership)
    FakeMembership.joins = asyncio.Event()
    agent = Coordinators("10.0.0.1:1,[fd00::2]:2", registry_pb2.JoinRequest(node_id="n"))
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(5):
            while len(agent.joined) < 2:
                await joins()
        assert sorted(agent.memberships) == ["10.0.0.1:1", "[fd00::2]:2"]
    finally:
        task.cancel()
        await agent.close()


# -- what other coordinators put on a node -------------------------------------------------------


async def test_a_node_counts_the_requests_others_had_at_its_last_report(
    registry: Registry, fleet: FakeFleet
) -> None:
    fleet.add(FakeNode("n1"))
    node, _ = registry.join(join_request("n1"))
    listener = fleet.nodes["n1"].load_listener
    assert listener is not None  # the registry asked for the node's load reports
    assert node.others_in_flight == 0  # no report yet: nothing known of others
    node.in_flight = 2
    listener(node_pb2.NodeLoad(node_id="n1", requests=5))
    assert node.others_in_flight == 3 and node.load_via_session
    # Its own requests come and go; the others' share stays what the report said.
    node.in_flight = 4
    assert node.others_in_flight == 3
    # A report that lags this coordinator's own starts never counts negative others.
    listener(node_pb2.NodeLoad(node_id="n1", requests=1))
    assert node.others_in_flight == 0
