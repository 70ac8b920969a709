"""The simulated engine's prefix cache (node_agent/engines/sim.py, "Prefix cache"), in process:
what a request finds cached (whole blocks of a shared prefix, never the last prompt token), LRU
eviction, the prefill cost of the uncached tokens (on virtual time, so exact), the lifetime
counters of ``load()``, and the agent flags."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any, cast

import pytest

from node_agent.engine import ChatTurn, Delta, EngineRequest, MediaInput
from node_agent.engines.sim import (
    SimConfig,
    SimEngine,
    cache_tokens,
    media_key,
    prompt_block_hashes,
    simulate,
    word,
)
from node_agent.main import build_engine, build_parser
from omni_rpc.validation import Sampling
from tests.unit.clock import VirtualClock

B = 16
_ids = iter(range(1, 1_000_000))


def words(n: int, tag: str = "w") -> str:
    """``n`` distinct words: a text prompt of ``n`` tokens."""
    return " ".join(f"{tag}{i}" for i in range(n))


def request(
    prompt: str = "",
    *,
    max_tokens: int = 4,
    ids: Sequence[int] = (),
    messages: Sequence[ChatTurn] = (),
    resume: Sequence[int] = (),
    inputs: Sequence[MediaInput] = (),
) -> EngineRequest:
    return EngineRequest(
        request_id=f"r-{next(_ids)}",
        sampling=Sampling(max_tokens=max_tokens, temperature=0.0),
        prompt=prompt,
        prompt_token_ids=tuple(ids),
        messages=tuple(messages),
        resume_token_ids=tuple(resume),
        resume_text="".join(word(t) for t in resume),
        inputs=tuple(inputs),
    )


def _w(*tokens: int) -> list[str]:
    """The words of ``tokens``."""
    return [word(t).strip() for t in tokens]


async def run(engine: SimEngine, req: EngineRequest) -> Delta:
    """Every delta of ``req`` merged into one."""
    total = Delta()
    async for delta in engine.generate(req):
        total.merge(delta)
    return total


async def cached(engine: SimEngine, req: EngineRequest) -> int:
    return (await run(engine, req)).cached_prompt_tokens


async def sim(**kwargs: Any) -> SimEngine:
    """A started simulated engine without latency, with a prefix cache unless told."""
    cfg: dict[str, Any] = {"ttft_ms": 0, "itl_ms": 0, "prefix_cache_tokens": 1024, **kwargs}
    engine = SimEngine(SimConfig(**cfg))
    await engine.start()
    return engine


# -- the block hashes: the documented function -------------------------------------------------


def test_block_hashes_are_the_documented_chain() -> None:
    text = request(words(40))
    seed = hashlib.blake2b(b"text", digest_size=16).digest()
    first = hashlib.blake2b(seed + words(16).encode(), digest_size=16).digest()
    second_words = " ".join(f"w{i}" for i in range(16, 32))
    second = hashlib.blake2b(first + second_words.encode(), digest_size=16).digest()
    assert prompt_block_hashes(text, B) == [first, second]  # 40 tokens: 2 whole blocks

    ids = request(ids=range(100, 120))
    seed = hashlib.blake2b(b"ids", digest_size=16).digest()
    block = ",".join(str(i) for i in range(100, 116)).encode()
    assert prompt_block_hashes(ids, B) == [hashlib.blake2b(seed + block, digest_size=16).digest()]

    image = MediaInput("image/png", b"\x89PNG...")
    with_media = request(words(16), inputs=[image])
    seed = hashlib.blake2b(b"text" + media_key(image), digest_size=16).digest()
    assert prompt_block_hashes(with_media, B) == [
        hashlib.blake2b(seed + words(16).encode(), digest_size=16).digest()
    ]
    assert prompt_block_hashes(request(words(15)), B) == []  # no whole block


def test_the_engine_prompt_of_a_resumed_request_is_followed_by_its_resumed_tokens() -> None:
    assert cache_tokens(request("a b  c", resume=[7, 300])) == ["a", "b", "c", *_w(7, 300)]
    assert cache_tokens(request(ids=[5, 6], resume=[7])) == [5, 6, 7]
    chat = [ChatTurn("system", "Be terse."), ChatTurn("user", "Hi")]
    assert cache_tokens(request(messages=chat)) == [
        "<|system|>",
        "Be",
        "terse.",
        "<|user|>",
        "Hi",
        "<|assistant|>",
    ]


# -- what a request finds cached -----------------------------------------------------------------


async def test_the_same_prompt_twice_finds_its_whole_blocks() -> None:
    engine = await sim()
    prompt = words(50)
    first = await run(engine, request(prompt))
    second = await run(engine, request(prompt))
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens == 48  # 3 whole blocks of 50 tokens
    assert second.prompt_tokens == first.prompt_tokens == 50
    # Caching changes when output comes, never what it is.
    expected = simulate(prompt, max_tokens=4)
    for out in (first, second):
        assert (out.text, out.token_ids, out.finish_reason) == (
            expected.text,
            expected.token_ids,
            "length",
        )


async def test_the_last_prompt_token_is_never_cached() -> None:
    engine = await sim()
    assert await cached(engine, request(words(32))) == 0
    assert await cached(engine, request(words(32))) == 31  # 2 whole blocks, capped at n - 1
    assert await cached(engine, request(words(16, "x"))) == 0
    assert await cached(engine, request(words(16, "x"))) == 15
    # An empty text prompt counts 1 token and has no block.
    assert await cached(engine, request("")) == 0
    assert await cached(engine, request("")) == 0


async def test_a_shared_prefix_with_different_tails_shares_its_whole_blocks() -> None:
    engine = await sim()
    prefix = words(40)
    assert await cached(engine, request(prefix + " " + words(10, "a"))) == 0
    # Tokens 0-31 (2 blocks) are shared; block 3 (tokens 32-47) mixes the prefix and the tail.
    assert await cached(engine, request(prefix + " " + words(10, "b"))) == 32
    # A prompt differing in its first token shares nothing, though the rest is the same.
    assert await cached(engine, request("other " + " ".join(prefix.split()[1:]))) == 0


async def test_the_match_stops_at_the_first_missing_block() -> None:
    engine = await sim()
    tail = " ".join(f"t{i}" for i in range(32))
    assert await cached(engine, request(words(16, "a") + " " + tail + " z")) == 0
    # Block 1 differs, blocks 2 and 3 are the same tokens: a chain hash sees another prefix.
    assert await cached(engine, request(words(16, "b") + " " + tail + " z")) == 0


async def test_token_id_prompts_share_blocks_and_not_with_text() -> None:
    engine = await sim()
    assert await cached(engine, request(ids=range(40))) == 0
    assert await cached(engine, request(ids=[*range(35), 9, 9, 9])) == 32
    assert await cached(engine, request(" ".join(str(i) for i in range(40)))) == 0


async def test_a_chat_sharing_the_system_prompt_finds_its_blocks() -> None:
    engine = await sim()
    system = ChatTurn("system", words(40, "s"))
    one = [system, ChatTurn("user", "What is the capital of France?")]
    two = [system, ChatTurn("user", "Name three rivers, please.")]
    assert await cached(engine, request(messages=one)) == 0
    # "<|system|>", 40 words, "<|user|>": 42 shared tokens, 2 whole blocks.
    assert await cached(engine, request(messages=two)) == 32
    # A chat is its rendered prompt: the text prompt finds the same blocks.
    rendered = "<|system|>\n" + words(40, "s") + "\n<|user|>\nSomething else entirely\n"
    assert await cached(engine, request(rendered)) == 32


async def test_media_is_part_of_the_prefix() -> None:
    engine = await sim()
    cat, dog = MediaInput("image/png", b"cat"), MediaInput("image/png", b"dog")
    prompt = words(40)
    assert await cached(engine, request(prompt, inputs=[cat])) == 0
    assert await cached(engine, request(prompt, inputs=[cat])) == 32
    assert await cached(engine, request(prompt, inputs=[dog])) == 0  # another image
    assert await cached(engine, request(prompt)) == 0  # none: not even the text is shared
    assert await cached(engine, request(prompt, inputs=[cat, dog])) == 0
    chat = [ChatTurn("user", prompt, media=(cat,))]
    assert await cached(engine, request(messages=chat)) == 0
    assert await cached(engine, request(messages=chat)) == 32


async def test_a_resumed_request_caches_its_prompt_and_resumed_tokens() -> None:
    engine = await sim()
    prompt = words(20)
    full = simulate(prompt, max_tokens=20)
    resumed = full.token_ids[:12]
    # vLLM sees prompt + resumed tokens: the same tokens as this text prompt.
    assert await cached(engine, request(prompt + "".join(word(t) for t in resumed))) == 0
    rest = await run(engine, request(prompt, max_tokens=20, resume=resumed))
    assert rest.prompt_tokens == 20  # the original prompt's, unchanged
    assert rest.cached_prompt_tokens == 31  # 32 tokens, 2 blocks, capped at n - 1
    assert resumed + rest.token_ids == full.token_ids
    assert engine.load().prompt_tokens == 32 + 32

    ids = list(range(500, 530))
    done = simulate(prompt_token_ids=ids, max_tokens=8).token_ids
    assert await cached(engine, request(ids=ids, max_tokens=8)) == 0
    # 30 + 3 = 33 tokens: 2 whole blocks, the first cached by the first attempt.
    assert await cached(engine, request(ids=ids, max_tokens=8, resume=done[:3])) == 16


# -- eviction -------------------------------------------------------------------------------------


async def test_a_full_cache_evicts_the_least_recently_used_block() -> None:
    engine = await sim(prefix_cache_tokens=2 * B)  # 2 blocks
    a, b, c = words(17, "a"), words(17, "b"), words(17, "c")  # 1 whole block each
    assert [await cached(engine, request(p)) for p in (a, b, a)] == [0, 0, 16]
    assert await cached(engine, request(c)) == 0  # evicts b, the least recently used
    assert await cached(engine, request(a)) == 16
    assert await cached(engine, request(b)) == 0  # evicted (and now evicts c)
    assert await cached(engine, request(c)) == 0


async def test_a_prompts_tail_is_evicted_before_its_head() -> None:
    engine = await sim(prefix_cache_tokens=2 * B)
    long, short = words(33, "a"), words(17, "b")
    assert await cached(engine, request(long)) == 0  # holds its 2 blocks
    assert await cached(engine, request(short)) == 0  # evicts the long prompt's 2nd block
    assert await cached(engine, request(long)) == 16  # its 1st block is still there
    assert await cached(engine, request(long)) == 32  # evicted the short one's block
    # A prompt longer than the cache keeps its head.
    assert await cached(engine, request(words(80, "c"))) == 0
    assert await cached(engine, request(words(80, "c"))) == 32


async def test_without_a_prefix_cache_nothing_is_cached() -> None:
    for size in (0, B - 1):  # none, or smaller than a block
        engine = await sim(prefix_cache_tokens=size)
        assert engine.cache_block_tokens == engine.cache_capacity_tokens == 0
        assert await cached(engine, request(words(50))) == 0
        assert await cached(engine, request(words(50))) == 0
        assert engine.load().prompt_tokens == 100
        assert engine.load().cached_prompt_tokens == 0


async def test_a_dead_engine_comes_back_cold() -> None:
    engine = await sim()
    await run(engine, request(words(40)))
    engine.set_fault("dead")
    engine.set_fault("none")
    assert await cached(engine, request(words(40))) == 0


# -- time to first token --------------------------------------------------------------------------


async def first_token_ms(engine: SimEngine, req: EngineRequest) -> float:
    loop = asyncio.get_running_loop()
    began = loop.time()
    stream = cast(AsyncGenerator[Delta, None], engine.generate(req))
    try:
        await anext(stream)
        return (loop.time() - began) * 1000
    finally:
        await stream.aclose()


async def test_uncached_prompt_tokens_cost_prefill_time(clock: VirtualClock) -> None:
    engine = await sim(ttft_ms=20, itl_ms=5, prefill_us_per_token=1000)
    prompt = words(100)
    # 100 uncached tokens at 1 ms each, then 4 (96 cached).
    assert await first_token_ms(engine, request(prompt)) == pytest.approx(20 + 100, abs=1e-6)
    assert await first_token_ms(engine, request(prompt)) == pytest.approx(20 + 4, abs=1e-6)
    # A resumed request prefills its resumed tokens too: 100 + 10, of which 96 are cached.
    resumed = request(prompt, max_tokens=20, resume=simulate(prompt, max_tokens=10).token_ids)
    assert await first_token_ms(engine, resumed) == pytest.approx(20 + 14, abs=1e-6)


async def test_no_prefill_cost_by_default(clock: VirtualClock) -> None:
    engine = await sim(ttft_ms=20, itl_ms=5)
    assert await first_token_ms(engine, request(words(100))) == pytest.approx(20, abs=1e-6)
    engine = await sim(ttft_ms=20, itl_ms=5, prefix_cache_tokens=0, prefill_us_per_token=500)
    for _ in range(2):  # no cache: every token is prefilled every time
        assert await first_token_ms(engine, request(words(100))) == pytest.approx(70, abs=1e-6)


# -- reporting ------------------------------------------------------------------------------------


async def test_load_counts_the_prompt_tokens_of_finished_requests() -> None:
    engine = await sim()
    prompt = words(50)
    await run(engine, request(prompt))
    await run(engine, request(prompt))
    load = engine.load()
    assert (load.prompt_tokens, load.cached_prompt_tokens) == (100, 48)

    # An aborted request reports what it found on its finish, and counts for nothing.
    req = request(prompt, max_tokens=50)
    stream = engine.generate(req)
    await anext(stream)
    await engine.abort(req.request_id)
    last = [delta async for delta in stream][-1]
    assert (last.finish_reason, last.cached_prompt_tokens) == ("abort", 48)
    load = engine.load()
    assert (load.prompt_tokens, load.cached_prompt_tokens) == (100, 48)
    assert (load.finished, load.aborted) == (2, 1)


async def test_only_the_finishing_delta_reports_cached_tokens() -> None:
    engine = await sim()
    await run(engine, request(words(40)))
    deltas = [d async for d in engine.generate(request(words(40), max_tokens=3))]
    assert [d.cached_prompt_tokens for d in deltas] == [0, 0, 32]
    assert deltas[-1].finish_reason == "length"


async def test_media_outputs_carry_the_cached_tokens_on_the_finish() -> None:
    engine = await sim(media_seconds=0.01, image_size=4)
    req = request(words(40), max_tokens=2)
    await run(engine, req)
    media = EngineRequest(
        request_id="m-1",
        sampling=req.sampling,
        prompt=req.prompt,
        modalities=("audio", "image"),
    )
    deltas = [d async for d in engine.generate(media)]
    assert deltas[-1].finish_reason == "length" and deltas[-1].cached_prompt_tokens == 32


# -- the agent's flags ----------------------------------------------------------------------------


def test_the_prefix_cache_is_off_by_default() -> None:
    args = build_parser().parse_args([])
    assert (
        args.sim_prefix_cache_tokens,
        args.sim_cache_block_tokens,
        args.sim_prefill_us_per_token,
    ) == (0, 16, 0.0)
    engine = build_engine(args)
    assert isinstance(engine, SimEngine)
    assert engine.cache_block_tokens == engine.cache_capacity_tokens == 0


def test_the_prefix_cache_flags_reach_the_engine() -> None:
    args = build_parser().parse_args(
        [
            "--sim-prefix-cache-tokens",
            "4096",
            "--sim-cache-block-tokens",
            "32",
            "--sim-prefill-us-per-token",
            "250",
        ]
    )
    engine = build_engine(args)
    assert isinstance(engine, SimEngine)
    assert (engine.cache_block_tokens, engine.cache_capacity_tokens) == (32, 4096)
    assert engine.cfg.prefill_us_per_token == 250.0


@pytest.mark.parametrize(
    "argv",
    [
        ["--sim-prefix-cache-tokens", "-1"],
        ["--sim-cache-block-tokens", "0"],
        ["--sim-prefill-us-per-token", "-1"],
    ],
)
def test_bad_prefix_cache_flags_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
