"""The pure pieces: backoff, routing strategies, request validation, the simulated engine."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest

from coordinator.strategies import LeastLoaded, PowerOfTwo, RoundRobin, make_strategy
from node_agent.engine import EngineRequest
from node_agent.engines.sim import SimConfig, SimEngine, simulate
from omni_rpc.backoff import Backoff
from omni_rpc.v1 import generate_pb2
from omni_rpc.validation import InvalidRequest, Sampling, validate_request


def test_backoff_full_jitter_stays_under_exponential_cap() -> None:
    b = Backoff(base_s=0.1, cap_s=1.0, rng=random.Random(1))
    ceilings = []
    for _ in range(8):
        ceiling = b.ceiling()
        ceilings.append(ceiling)
        assert 0.0 <= b.next_delay() <= ceiling
    assert ceilings[:5] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    assert ceilings[-1] == 1.0
    b.reset()
    assert b.ceiling() == pytest.approx(0.1)


def test_backoff_draws_spread_over_the_whole_range() -> None:
    b = Backoff(base_s=1.0, cap_s=1.0, rng=random.Random(7))
    draws = [b.next_delay() for _ in range(500)]
    assert min(draws) < 0.05 and max(draws) > 0.95


@dataclass
class Node:
    node_id: str
    in_flight: int = 0
    capacity: int = 4
    kv_cache_usage: float = 0.0
    others_in_flight: int = 0
    cache_block_tokens: int = 16
    cache_capacity_tokens: int = 0


def test_least_loaded_counts_what_other_coordinators_have_on_a_node() -> None:
    """Each coordinator knows only its own requests; the agents' load reports add the others'."""
    quiet_here = Node("a", in_flight=0, others_in_flight=3)
    busy_here = Node("b", in_flight=1)
    assert LeastLoaded().pick([quiet_here, busy_here]) is busy_here
    assert PowerOfTwo().pick([quiet_here, busy_here]) is busy_here


def test_round_robin_cycles_through_the_candidates_in_their_order() -> None:
    nodes = [Node("a"), Node("b"), Node("c")]  # candidates come in node id order
    rr = RoundRobin()
    assert [rr.pick(nodes).node_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    # A node going away keeps the rotation going over the others.
    assert [rr.pick(nodes[1:]).node_id for _ in range(2)] == ["b", "c"]


def test_least_loaded_prefers_lower_utilization_and_rotates_ties() -> None:
    ll = LeastLoaded()
    busy = [Node("a", in_flight=3), Node("b", in_flight=1), Node("c", in_flight=2)]
    assert ll.pick(busy).node_id == "b"
    idle = [Node("a"), Node("b"), Node("c")]
    assert {ll.pick(idle).node_id for _ in range(3)} == {"a", "b", "c"}
    # Utilization is relative to capacity: 2/8 beats 1/2.
    assert ll.pick([Node("small", 1, 2), Node("big", 2, 8)]).node_id == "big"
    # Equally busy: the engine with more KV cache free wins, whatever the rotation.
    full, free = Node("a", 1, 4, kv_cache_usage=0.9), Node("b", 1, 4, kv_cache_usage=0.1)
    assert {ll.pick([full, free]).node_id for _ in range(4)} == {"b"}


def test_power_of_two_never_picks_the_busiest_of_three() -> None:
    p2 = PowerOfTwo(random.Random(3))
    nodes = [Node("a", 0), Node("b", 5), Node("c", 9)]
    assert "c" not in {p2.pick(nodes).node_id for _ in range(200)}


def test_unknown_strategy_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="least_loaded"):
        make_strategy("fastest")


def _request(**sampling: object) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(prompt="hi")
    for key, value in sampling.items():
        setattr(request.sampling, key, value)
    return request


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (generate_pb2.GenerateRequest(), "prompt"),
        (_request(max_tokens=0), "sampling.max_tokens"),
        (_request(max_tokens=-3), "sampling.max_tokens"),
        (_request(max_tokens=10**6), "sampling.max_tokens"),
        (_request(temperature=-0.5), "sampling.temperature"),
        (_request(temperature=math.nan), "sampling.temperature"),
        (_request(temperature=math.inf), "sampling.temperature"),
        (_request(top_p=0.0), "sampling.top_p"),
        (_request(top_p=1.5), "sampling.top_p"),
        (_request(top_k=-2), "sampling.top_k"),
    ],
)
def test_validation_names_the_field(request_: generate_pb2.GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_request(request_)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_validation_applies_defaults_and_accepts_edge_values() -> None:
    assert validate_request(_request()) == Sampling()
    ok = validate_request(_request(max_tokens=1, temperature=0.0, top_p=1.0, top_k=-1))
    assert (ok.max_tokens, ok.temperature, ok.top_k) == (1, 0.0, -1)


def test_simulate_is_deterministic_and_depends_on_prompt_and_seed() -> None:
    a = simulate("hello", max_tokens=12, seed=1)
    assert a == simulate("hello", max_tokens=12, seed=1)
    assert a.token_ids != simulate("hello", max_tokens=12, seed=2).token_ids
    assert a.token_ids != simulate("hello!", max_tokens=12, seed=1).token_ids
    assert simulate(prompt_token_ids=[1, 2, 3], max_tokens=4).prompt_tokens == 3
    assert a.finish_reason == "length" and len(a.token_ids) == 12
    # A prefix of a longer generation is the shorter generation.
    assert simulate("hello", max_tokens=20, seed=1).token_ids[:12] == a.token_ids


def test_simulate_stops_before_the_stop_string() -> None:
    full = simulate("stop me", max_tokens=30)
    stop = full.text.split()[5]
    cut = simulate("stop me", max_tokens=30, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


@pytest.mark.parametrize("stop", [(), ("zz",)])
async def test_sim_engine_streams_exactly_what_simulate_says(stop: tuple[str, ...]) -> None:
    full = simulate("stream me", max_tokens=40, seed=5)
    stops = stop or ()
    if stop:
        # A stop string spanning two tokens exercises the hold-back of partial matches.
        words = full.text.split()
        stops = (words[10][-1] + " " + words[11][:2],)
    expected = simulate("stream me", max_tokens=40, seed=5, stop=stops)
    engine = SimEngine(SimConfig(ttft_ms=0, itl_ms=0))
    await engine.start()
    request = EngineRequest(
        request_id="r1", prompt="stream me", sampling=Sampling(max_tokens=40, seed=5, stop=stops)
    )
    text, ids, finish = "", [], None
    async for delta in engine.generate(request):
        text += delta.text
        ids += delta.token_ids
        finish = delta.finish_reason
    assert (text, ids, finish) == (expected.text, expected.token_ids, expected.finish_reason)
    assert engine.load().finished == 1 and engine.load().running == 0


def test_circuit_breaker_ejects_for_longer_each_time_and_forgives() -> None:
    from coordinator.circuit import BreakerPolicy, CircuitBreaker

    b = CircuitBreaker(BreakerPolicy(threshold=3, base_s=10.0, max_s=25.0))
    assert [b.record_failure(now=0.0) for _ in range(3)] == [0.0, 0.0, 10.0]
    assert b.is_open(now=5.0) and not b.is_open(now=10.0)
    b.record_success()  # resets the consecutive count, not the ejection history
    assert [b.record_failure(now=11.0) for _ in range(3)][-1] == 20.0
    assert [b.record_failure(now=32.0) for _ in range(3)][-1] == 25.0  # capped
    # Quiet for longer than the longest ejection: the history is forgotten.
    assert [b.record_failure(now=100.0) for _ in range(3)][-1] == 10.0
