"""Cache-aware and consistent-hash routing, in process: where prefixes and sessions go, what
moves when a node leaves or is too busy, and the index's memory bound."""

from __future__ import annotations

import collections
import tracemalloc
from dataclasses import dataclass

import pytest

from coordinator.prefix import (
    MAX_BLOCKS_PER_NODE,
    TEXT_BYTES_PER_TOKEN,
    NodePrefixes,
    RequestPrefix,
    prefix_chain,
)
from coordinator.strategies import CacheAware, ConsistentHash, make_strategy
from omni_rpc.v1 import generate_pb2


@dataclass
class Node:
    node_id: str
    in_flight: int = 0
    capacity: int = 64
    kv_cache_usage: float = 0.0
    others_in_flight: int = 0
    cache_block_tokens: int = 16
    cache_capacity_tokens: int = 0


def nodes(count: int, **fields: int) -> list[Node]:
    return [Node(f"node-{i}", **fields) for i in range(count)]


SYSTEM = "You are a careful assistant for the accounting team. " * 20  # ~1100 bytes


def text(prompt: str, **fields: object) -> RequestPrefix:
    return RequestPrefix(generate_pb2.GenerateRequest(prompt=prompt, **fields))  # type: ignore[arg-type]


# -- prefixes ------------------------------------------------------------------------------------


def test_prompts_share_the_hashes_of_exactly_the_blocks_they_share() -> None:
    size = 16 * TEXT_BYTES_PER_TOKEN
    a = prefix_chain(generate_pb2.GenerateRequest(prompt=SYSTEM + "first question " * 9), 16)
    b = prefix_chain(generate_pb2.GenerateRequest(prompt=SYSTEM + "another one " * 9), 16)
    shared = len(SYSTEM) // size
    assert a[:shared] == b[:shared] and a[shared] != b[shared]
    ids = generate_pb2.GenerateRequest(prompt_token_ids=list(range(40)))
    assert len(prefix_chain(ids, 16)) == 2  # whole blocks only
    # Another model's cache is not this one's.
    other = generate_pb2.GenerateRequest(prompt=SYSTEM, model="other")
    assert prefix_chain(other, 16)[0] != a[0]


def test_a_chat_shares_its_system_prompt_and_earlier_turns() -> None:
    def chat(*turns: tuple[str, str]) -> list[int]:
        request = generate_pb2.GenerateRequest(
            messages=[generate_pb2.ChatMessage(role=r, content=c) for r, c in turns]
        )
        return prefix_chain(request, 16)

    first = chat(("system", SYSTEM), ("user", "How do I file an expense?"))
    later = chat(
        ("system", SYSTEM),
        ("user", "How do I file an expense?"),
        ("assistant", "Open the form."),
        ("user", "And then?"),
    )
    other_user = chat(("system", SYSTEM), ("user", "Where is the VAT report?"))
    assert later[: len(first)] == first
    assert len(set(first) & set(other_user)) == len(SYSTEM) // 64  # the system prompt's blocks


def test_a_node_evicts_least_recently_used_blocks_at_its_capacity() -> None:
    held = NodePrefixes(block_tokens=16, capacity_tokens=16 * 3)
    held.add([1, 2])
    held.add([7])
    held.add([1, 2])  # used again: most recent
    held.add([9])  # over capacity: 7 goes
    assert set(held.blocks) == {1, 2, 9}
    assert held.matched([1, 2, 3]) == 2 and held.matched([7]) == 0


def test_over_capacity_a_prompts_tail_goes_before_its_shared_head() -> None:
    held = NodePrefixes(block_tokens=16, capacity_tokens=16 * 4)
    held.add([1, 2, 3])  # a system prompt (1, 2) and a turn (3)
    held.add([8, 9])  # another prompt: one block must go
    # The engine frees a request's tail first: the shared head is still there.
    assert held.matched([1, 2, 5]) == 2
    assert held.matched([1, 2, 3]) == 2 and held.matched([8, 9]) == 2


def test_a_nodes_capacity_follows_the_bytes_per_token_its_answers_show() -> None:
    strategy = CacheAware()
    pool = nodes(1, cache_capacity_tokens=16 * 100)
    prompt = text(SYSTEM + "question")
    strategy.pick(pool, prefix=prompt)
    entry = strategy.index.nodes["node-0"]
    assert entry.capacity_blocks == 100
    # Its tokenizer makes 8 bytes a token: the engine's 1600 tokens hold twice the text.
    for _ in range(100):
        strategy.observe("node-0", prompt, prompt.text_bytes // 8)
    assert 195 <= entry.capacity_blocks <= 200
    # 2 bytes a token: half; what no longer fits is forgotten, least recently used first.
    for _ in range(200):
        strategy.observe("node-0", prompt, prompt.text_bytes // 2)
    assert 50 <= entry.capacity_blocks <= 51
    # Token-id prompts and prompts shorter than a block teach nothing.
    strategy.observe(
        "node-0", RequestPrefix(generate_pb2.GenerateRequest(prompt_token_ids=[1] * 64)), 64
    )
    strategy.observe("node-0", text("hi"), 1)
    assert 50 <= entry.capacity_blocks <= 51


def test_the_index_stays_within_its_bound_under_100k_distinct_prompts() -> None:
    strategy = CacheAware()
    pool = nodes(4)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            # Two whole blocks each: 200k blocks, more than the 4 nodes' bound.
            strategy.pick(pool, prefix=text(f"{i:>16} distinct prompt " * 4))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert strategy.index.size <= 4 * MAX_BLOCKS_PER_NODE
    assert all(len(n.blocks) <= MAX_BLOCKS_PER_NODE for n in strategy.index.nodes.values())
    # About 100 bytes a block (an OrderedDict entry and its int): the bound holds in bytes too.
    assert grown < 4 * MAX_BLOCKS_PER_NODE * 200


# -- cache_aware -------------------------------------------------------------------------------


def test_repeated_prefixes_land_on_the_node_that_has_them_until_it_is_too_busy() -> None:
    strategy = CacheAware(balance_abs_threshold=4, balance_rel_threshold=1.5)
    pool = nodes(4)
    first = strategy.pick(pool, prefix=text(SYSTEM + "question 0"))
    assert isinstance(first, Node)
    for i in range(1, 5):
        chosen = strategy.pick(pool, prefix=text(SYSTEM + f"question {i}"))
        assert chosen is first  # the system prompt is cached there
        first.in_flight += 1
    # Busier than the least loaded node by more than 4 requests and 1.5 times: load wins.
    first.in_flight = 5
    spill = strategy.pick(pool, prefix=text(SYSTEM + "question 9"))
    assert spill is not first
    # The prefix now lives on both: the next one goes to the less busy of the two.
    assert strategy.pick(pool, prefix=text(SYSTEM + "question 10")) is spill


def test_prompts_with_nothing_cached_are_spread_by_load() -> None:
    strategy = CacheAware()
    pool = nodes(4)
    counts: collections.Counter[str] = collections.Counter()
    for i in range(40):
        chosen = strategy.pick(pool, prefix=text(f"unrelated prompt {i} " * 10))
        assert isinstance(chosen, Node)
        counts[chosen.node_id] += 1
        chosen.in_flight += 1
    assert sorted(counts.values()) == [10, 10, 10, 10]


def test_new_prefixes_go_to_the_emptiest_cache_not_the_idlest_node() -> None:
    strategy = CacheAware()
    pool = nodes(4)
    for node in pool[1:]:
        node.in_flight = 2  # busier, yet well within the balance thresholds
    homes = [
        strategy.pick(pool, prefix=text(f"tenant {t} system prompt " * 30)).node_id
        for t in range(8)
    ]
    # Two tenants per cache, not all on the idle node-0.
    assert sorted(collections.Counter(homes).values()) == [2, 2, 2, 2]


def test_prompts_shorter_than_a_block_go_by_load() -> None:
    strategy = CacheAware()
    pool = nodes(3)
    pool[0].in_flight = pool[2].in_flight = 1
    strategy.pick(pool, prefix=text("tenant 0 system prompt " * 30))  # something cached somewhere
    for i in range(5):
        assert strategy.pick(pool, prefix=text(f"hi {i}")) is pool[1]


def test_a_node_leaving_moves_only_its_own_prefixes() -> None:
    strategy = CacheAware()
    pool = nodes(4)
    homes = {}
    for tenant in range(12):
        prompt = f"tenant {tenant} system prompt " * 30
        homes[tenant] = strategy.pick(pool, prefix=text(prompt + "hello")).node_id
        pool.sort(key=lambda n: n.node_id)
    gone = homes[0]
    strategy.forget(gone)
    rest = [n for n in pool if n.node_id != gone]
    for tenant in range(12):
        prompt = f"tenant {tenant} system prompt " * 30
        now = strategy.pick(rest, prefix=text(prompt + "again")).node_id
        if homes[tenant] != gone:
            assert now == homes[tenant], tenant  # untouched by the departure
        else:
            assert now != gone


def test_affinity_key_is_a_hint_for_cache_aware() -> None:
    strategy = CacheAware()
    pool = nodes(3)
    home = strategy.pick(pool, key="session-7", prefix=text("hi"))
    pool[0].in_flight = pool[1].in_flight = pool[2].in_flight = 1
    # Nothing of the short prompts is in whole blocks: the key keeps the session in place.
    for turn in range(5):
        assert strategy.pick(pool, key="session-7", prefix=text(f"turn {turn}")) is home


# -- consistent_hash ---------------------------------------------------------------------------


def test_sessions_stick_to_their_node() -> None:
    strategy = ConsistentHash()
    pool = nodes(5)
    homes = {f"user-{i}": strategy.pick(pool, key=f"user-{i}").node_id for i in range(200)}
    for _ in range(3):
        for key, home in homes.items():
            assert strategy.pick(pool, key=key).node_id == home
    # Spread over every node.
    assert len(set(homes.values())) == 5


def test_a_node_leaving_or_joining_moves_only_the_keys_it_must() -> None:
    strategy = ConsistentHash()
    pool = nodes(5)
    keys = [f"user-{i}" for i in range(1000)]
    before = {k: strategy.pick(pool, key=k).node_id for k in keys}
    gone = "node-2"
    strategy.forget(gone)
    rest = [n for n in pool if n.node_id != gone]
    after = {k: strategy.pick(rest, key=k).node_id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone for k in moved)  # only the leaver's keys
    joined = [*pool, Node("node-5")]
    grown = {k: strategy.pick(joined, key=k).node_id for k in keys}
    taken = [k for k in keys if grown[k] != before[k]]
    assert taken and all(grown[k] == "node-5" for k in taken)  # only to the newcomer
    assert len(taken) < len(keys) / 3


def test_a_session_moves_when_its_node_is_over_its_load_bound() -> None:
    strategy = ConsistentHash(load_factor=1.25)
    pool = nodes(4)
    home = strategy.pick(pool, key="hot-session")
    assert isinstance(home, Node)
    for other in pool:
        other.in_flight = 2
    home.in_flight = 2
    assert strategy.pick(pool, key="hot-session") is home  # at the average: stays
    home.in_flight = 5  # bound: ceil(1.25 * (11 + 1) / 4) = 4
    moved = strategy.pick(pool, key="hot-session")
    assert moved is not home
    home.in_flight = 2
    assert strategy.pick(pool, key="hot-session") is home  # back once under its bound


def test_requests_without_a_key_are_spread_by_load() -> None:
    strategy = ConsistentHash()
    pool = nodes(3)
    pool[0].in_flight = 3
    pool[1].in_flight = 1
    pool[2].in_flight = 2
    assert strategy.pick(pool) is pool[1]


@pytest.mark.parametrize("name", ["cache_aware", "consistent_hash"])
def test_the_new_strategies_are_known_by_name(name: str) -> None:
    assert make_strategy(name).name == name


def test_the_sdk_sends_the_affinity_key() -> None:
    from omni_rpc.sdk.orchestrator import build_chat_request, build_request

    assert build_request("hi", None, {"affinity_key": "user-7"}).affinity_key == "user-7"
    chat = build_chat_request([{"role": "user", "content": "hi"}], None, {"affinity_key": "s"})
    assert chat.affinity_key == "s"
    assert build_request("hi", None, {}).affinity_key == ""
