"""Media outputs: the simulated engine's WAV and PNG, Delta merging, and the coordinator's
hold-until-last_chunk relay (exactly once and whole across a failover), in process."""

from __future__ import annotations

import io
import struct
import wave
import zlib
from collections.abc import AsyncIterator

import grpc
import pytest

from coordinator.balancer import Balancer
from coordinator.dispatch import Dispatcher, DispatchError
from coordinator.node_client import NodeCallError
from coordinator.registry import HEALTHY, Registry
from coordinator.strategies import RoundRobin
from node_agent.engine import Delta, EngineRequest, MediaPiece
from node_agent.engines.sim import (
    MEDIA_CHUNK_BYTES,
    SimConfig,
    SimEngine,
    media_pieces,
    sim_png,
    sim_wav,
    simulate,
)
from omni_rpc.metrics import CoordinatorMetrics
from omni_rpc.v1 import generate_pb2, node_agent_pb2
from omni_rpc.validation import Sampling
from tests.unit.fakes import FakeAttempt, FakeFleet, FakeNode, join_request

PROMPT = "draw me a sound"


def parse_png(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the decompressed IDAT of a PNG (checking every chunk's CRC)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, {}
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        at += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    return width, height, zlib.decompress(chunks[b"IDAT"])


def test_sim_wav_is_a_wav_of_the_documented_tone() -> None:
    data = sim_wav(PROMPT, seed=7, seconds=1.5)
    with wave.open(io.BytesIO(data)) as reader:
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (
            1,
            2,
            16000,
        )
        assert reader.getnframes() == 24000
    assert data == sim_wav(PROMPT, seed=7, seconds=1.5)  # a function of the request
    assert data != sim_wav(PROMPT, seed=8, seconds=1.5)


def test_sim_png_is_a_png_of_the_documented_colours() -> None:
    data = sim_png(PROMPT, seed=3, size=40)
    width, height, raw = parse_png(data)
    assert (width, height) == (40, 40)
    assert len(raw) == 40 * (1 + 3 * 40)
    assert raw[0] == 0  # filter byte of row 0
    assert data != sim_png(PROMPT, seed=4, size=40)


def test_media_pieces_and_delta_merge() -> None:
    data = bytes(range(256)) * 200  # 51200 bytes: four pieces
    pieces = media_pieces(2, "audio/wav", data)
    assert [len(p.data) for p in pieces] == [MEDIA_CHUNK_BYTES] * 3 + [51200 - 3 * 16384]
    assert [p.last_chunk for p in pieces] == [False, False, False, True]
    merged = Delta(text="a", token_ids=[1], outputs=[pieces[0]])
    merged.merge(Delta(text="b", token_ids=[2], outputs=pieces[1:3]))
    merged.merge(Delta(outputs=[pieces[3]], finish_reason="length"))
    assert merged.text == "ab" and merged.token_ids == [1, 2]
    assert merged.outputs == pieces and b"".join(p.data for p in merged.outputs) == data
    assert merged.finish_reason == "length"


async def _run_sim(request: EngineRequest, cfg: SimConfig) -> list[Delta]:
    engine = SimEngine(cfg)
    await engine.start()
    return [d async for d in engine.generate(request)]


async def test_the_sim_engine_streams_text_then_items_then_the_finish() -> None:
    cfg = SimConfig(ttft_ms=0, itl_ms=0, media_seconds=1.0, image_size=90)
    sampling = Sampling(max_tokens=5, seed=1)
    request = EngineRequest("r-1", sampling, prompt=PROMPT, modalities=("text", "image", "audio"))
    deltas = await _run_sim(request, cfg)
    assert "".join(d.text for d in deltas) == simulate(PROMPT, max_tokens=5, seed=1).text
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 5
    pieces = [p for d in deltas for p in d.outputs]
    # Both items span several pieces, audio (index 0) first.
    assert [p.index for p in pieces] == [0, 0, 1, 1]
    wav = b"".join(p.data for p in pieces if p.index == 0)
    png = b"".join(p.data for p in pieces if p.index == 1)
    assert wav == sim_wav(PROMPT, seed=1, seconds=1.0)
    assert png == sim_png(PROMPT, seed=1, size=90)
    assert {p.mime_type for p in pieces if p.index == 1} == {"image/png"}
    # Resumed after the text and the first item: only the second item, whole.
    resumed = EngineRequest(
        "r-2",
        sampling,
        prompt=PROMPT,
        modalities=("audio", "image"),
        resume_token_ids=tuple(simulate(PROMPT, max_tokens=5, seed=1).token_ids),
        resume_text=simulate(PROMPT, max_tokens=5, seed=1).text,
        media_items_delivered=1,
    )
    again = await _run_sim(resumed, cfg)
    assert "".join(d.text for d in again) == "" and again[-1].finish_reason == "length"
    assert {p.index for d in again for p in d.outputs} == {1}
    assert b"".join(p.data for d in again for p in d.outputs) == png


# -- the coordinator's relay -------------------------------------------------------------

ITEMS = [("audio/wav", b"A" * 50_000), ("image/png", b"P" * 30_000)]
TOKENS = [11, 12, 13]


class MediaAttempt(FakeAttempt):
    """Three tokens, then two media items in 10 000-byte pieces; may die after ``die_after``
    pieces (counted over this attempt's pieces)."""

    die_after: int | None = None

    async def __aiter__(self) -> AsyncIterator[generate_pb2.GenerateResponse]:
        node = self.node
        node.active.add(self)
        try:
            resume = self.first.resume
            request_id, node_id = self.first.generate.request_id, node.node_id
            for token in TOKENS[len(resume.token_ids) :]:
                await self._pause(0.01)
                yield generate_pb2.GenerateResponse(
                    text=f"<{token}>", token_ids=[token], request_id=request_id, node_id=node_id
                )
            sent = 0
            for index, (mime, data) in enumerate(ITEMS):
                if index < resume.media_items_delivered:
                    continue
                for at in range(0, len(data), 10_000):
                    if self.die_after is not None and sent >= self.die_after:
                        raise NodeCallError(grpc.StatusCode.UNAVAILABLE, "killed mid-item")
                    await self._pause(0.01)
                    piece = generate_pb2.Media(
                        index=index,
                        mime_type=mime,
                        data=data[at : at + 10_000],
                        last_chunk=at + 10_000 >= len(data),
                    )
                    yield generate_pb2.GenerateResponse(
                        outputs=[piece], request_id=request_id, node_id=node_id
                    )
                    sent += 1
            final = generate_pb2.GenerateResponse(
                finish_reason="length", request_id=request_id, node_id=node_id
            )
            final.usage.completion_tokens = len(TOKENS)
            yield final
        finally:
            node.active.discard(self)


class MediaNode(FakeNode):
    def __init__(self, node_id: str, die_after: int | None = None) -> None:
        super().__init__(node_id)
        self.die_after = die_after

    def generate(self, first: node_agent_pb2.AgentRequest, timeout_s: float | None) -> MediaAttempt:
        self.attempts.append(first)
        attempt = MediaAttempt(self, first, timeout_s)
        attempt.die_after, self.die_after = self.die_after, None
        self.streams.append(attempt)
        return attempt


def _nodes(registry: Registry, fleet: FakeFleet, *nodes: MediaNode) -> None:
    for fake in nodes:
        fleet.add(fake)
        join = join_request(fake.node_id)
        join.output_modalities.extend(["audio", "image"])
        node, _ = registry.join(join)
        registry.report_probe(node, True, False, "health check: SERVING")
        assert node.state == HEALTHY


def _dispatcher(registry: Registry, max_held_media_bytes: int = 1 << 26) -> Dispatcher:
    return Dispatcher(
        registry,
        Balancer(registry, RoundRobin()),
        2,
        no_node_wait_s=30.0,
        metrics=CoordinatorMetrics(),
        max_held_media_bytes=max_held_media_bytes,
    )


def _request() -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(prompt=PROMPT, modalities=["text", "audio", "image"])


def _items(responses: list[generate_pb2.GenerateResponse]) -> dict[int, list[bytes]]:
    items: dict[int, list[bytes]] = {}
    for response in responses:
        for piece in response.outputs:
            items.setdefault(piece.index, []).append(piece.data)
    return items


async def test_pieces_are_held_until_the_item_completes(
    registry: Registry, fleet: FakeFleet
) -> None:
    _nodes(registry, fleet, MediaNode("n1"))
    responses = [r async for r in _dispatcher(registry).generate(_request(), None)]
    # Each item travels in one message, relayed when its last piece arrived.
    with_media = [r for r in responses if r.outputs]
    assert [[p.index for p in r.outputs] for r in with_media] == [[0] * 5, [1] * 3]
    assert [p.last_chunk for p in with_media[0].outputs] == [False] * 4 + [True]
    assert {i: b"".join(d) for i, d in _items(responses).items()} == {
        0: ITEMS[0][1],
        1: ITEMS[1][1],
    }
    assert responses[-1].finish_reason == "length"


@pytest.mark.parametrize("die_after", [2, 5, 6])
async def test_a_failover_mid_item_delivers_every_item_once_and_whole(
    registry: Registry, fleet: FakeFleet, die_after: int
) -> None:
    _nodes(registry, fleet, MediaNode("n1", die_after=die_after), MediaNode("n2"))
    responses = [r async for r in _dispatcher(registry).generate(_request(), None)]
    assert [t for r in responses for t in r.token_ids] == TOKENS
    items = _items(responses)
    assert {i: b"".join(d) for i, d in items.items()} == {0: ITEMS[0][1], 1: ITEMS[1][1]}
    assert [len(items[0]), len(items[1])] == [5, 3]  # no piece twice
    resume = fleet.nodes["n2"].attempts[-1].resume
    # Died in item 0 (pieces 0-4) or in item 1 (after item 0 completed).
    assert resume.media_items_delivered == (0 if die_after < 5 else 1)
    assert list(resume.token_ids) == TOKENS
    # Item 0 came from the node that completed it: n1 when it did, else n2.
    node_of_item0 = next(r.node_id for r in responses if r.outputs and r.outputs[0].index == 0)
    assert node_of_item0 == ("n2" if die_after < 5 else "n1")


async def test_held_media_is_bounded(registry: Registry, fleet: FakeFleet) -> None:
    _nodes(registry, fleet, MediaNode("n1"))
    with pytest.raises(DispatchError) as caught:
        async for _ in _dispatcher(registry, max_held_media_bytes=25_000).generate(
            _request(), None
        ):
            pass
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_held_media_bytes=25000" in caught.value.message


def test_a_large_item_is_relayed_in_messages_within_the_limit() -> None:
    from coordinator.dispatch import _with_media
    from omni_rpc import config

    pieces = [
        generate_pb2.Media(index=0, data=b"x" * (400 * 1024), last_chunk=i == 5) for i in range(6)
    ]
    response = generate_pb2.GenerateResponse(text="t", token_ids=[1], finish_reason="stop")
    messages = _with_media(response, pieces)
    assert len(messages) > 1
    assert all(
        sum(len(p.data) for p in m.outputs) <= config.MEDIA_RELAY_MESSAGE_BYTES for m in messages
    )
    assert [p for m in messages for p in m.outputs] == pieces
    assert messages[0].text == "t" and messages[-1].finish_reason == "stop"
    assert not messages[0].finish_reason


def test_media_piece_is_frozen() -> None:
    piece = MediaPiece(0, "audio/wav", b"x", True)
    with pytest.raises(AttributeError):
        piece.index = 1  # type: ignore[misc]
