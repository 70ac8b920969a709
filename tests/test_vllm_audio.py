"""Media inputs on the real engine: vLLM (its CPU build) serving tiny-qwen2-audio, a Qwen2-Audio
of random weights built locally (``omni model prepare tiny-qwen2-audio``), behind two agents.

Its output is gibberish, but a function of the audio: a clip changes it, another clip changes
it again, and it is the same on every run. The test that kills an agent runs last.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import random
import signal
import struct
import wave
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from node_agent.models import prepare
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.v1 import coordinator_pb2, coordinator_pb2_grpc, generate_pb2
from tests.conftest import wait_healthy

pytestmark = [pytest.mark.timeout(900)]

MODEL = "tiny-qwen2-audio"
ENGINE_FLAGS = ["--max-model-len", "1024", "--max-num-seqs", "4"]
PROMPT = "What is this sound?"
TOKENS = 12
RESUME_TOKENS = 48


def wav(samples: list[float], rate: int = 16000) -> bytes:
    """16-bit mono PCM WAV bytes of ``samples`` in [-1, 1]."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(32767 * s)) for s in samples))
    return out.getvalue()


def sine(freq: float, seconds: float = 1.0, rate: int = 16000) -> bytes:
    samples = [0.5 * math.sin(2 * math.pi * freq * i / rate) for i in range(int(seconds * rate))]
    return wav(samples, rate)


def noise(seconds: float = 1.0, rate: int = 16000) -> bytes:
    rng = random.Random(15)
    return wav([rng.uniform(-0.5, 0.5) for _ in range(int(seconds * rate))], rate)


SINE = sine(440.0)
NOISE = noise()


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return prepare(MODEL)


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        num_nodes=2,
        engine="vllm",
        model=MODEL,
        agent_args=ENGINE_FLAGS,
        health_check_interval=0.5,
        coordinator_args=["--health-check-timeout", "2"],
        log_dir=tmp_path_factory.mktemp("vllm-audio-cluster"),
    )
    try:
        cluster.start()
        wait_healthy(cluster, 2, timeout=600)
        yield cluster
    finally:
        cluster.stop()


def request(
    audio: list[bytes], max_tokens: int = TOKENS, prompt: str = PROMPT
) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        prompt=prompt,
        inputs=[generate_pb2.Media(mime_type="audio/wav", data=a) for a in audio],
        sampling=generate_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True
        ),
    )


async def run(
    cluster: LocalCluster, req: generate_pb2.GenerateRequest
) -> list[generate_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        return [r async for r in stub.Generate(req, timeout=300)]


def ids(responses: list[generate_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


async def test_the_agents_advertise_audio_input(cluster: LocalCluster) -> None:
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)

        nodes = (await stub.ListNodes(coordinator_pb2.ListNodesRequest())).nodes
    assert len(nodes) == 2
    for node in nodes:
        assert list(node.input_modalities) == ["audio"]
        assert list(node.output_modalities) == []


async def test_audio_changes_the_output_and_runs_repeat(cluster: LocalCluster) -> None:
    with_sine, with_noise, without, again = await asyncio.gather(
        run(cluster, request([SINE])),
        run(cluster, request([NOISE])),
        run(cluster, request([])),
        run(cluster, request([SINE])),
    )
    for out in (with_sine, with_noise, without, again):
        assert len(ids(out)) == TOKENS and out[-1].finish_reason == "length"
    assert ids(with_sine) != ids(without)
    assert ids(with_sine) != ids(with_noise)
    assert ids(with_sine) == ids(again)
    # vLLM's count: the placeholder expanded to the clip's 25 tokens (1 s at 16 kHz).
    assert with_sine[-1].usage.prompt_tokens >= without[-1].usage.prompt_tokens + 25
    # A prompt that places the audio itself gets no second placeholder: the same output.
    placed = await run(
        cluster, request([SINE], prompt="Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n" + PROMPT)
    )
    assert ids(placed) == ids(with_sine)


async def test_a_chat_with_an_audio_part(cluster: LocalCluster) -> None:
    def chat(audio: bytes) -> generate_pb2.GenerateRequest:
        return generate_pb2.GenerateRequest(
            messages=[
                generate_pb2.ChatMessage(
                    role="user",
                    parts=[
                        generate_pb2.ContentPart(
                            media=generate_pb2.Media(mime_type="audio/wav", data=audio)
                        ),
                        generate_pb2.ContentPart(text=PROMPT),
                    ],
                )
            ],
            sampling=generate_pb2.SamplingParams(
                max_tokens=TOKENS, temperature=0.0, ignore_eos=True
            ),
        )

    a, b, again = await asyncio.gather(
        run(cluster, chat(SINE)), run(cluster, chat(NOISE)), run(cluster, chat(SINE))
    )
    assert len(ids(a)) == TOKENS and ids(a) != ids(b) and ids(a) == ids(again)


async def test_bad_audio_is_invalid_argument_naming_the_input(cluster: LocalCluster) -> None:
    cases = [
        (generate_pb2.Media(mime_type="audio/wav", data=b"not a wav"), "inputs[0]"),
        (generate_pb2.Media(mime_type="audio/wav", data=sine(440.0, rate=8000)), "16000 Hz"),
        (generate_pb2.Media(mime_type="audio/mpeg", data=b"ID3..."), "audio/mpeg"),
        (generate_pb2.Media(mime_type="image/png", data=b"\x89PNG"), "image"),
    ]
    for media, expected in cases:
        req = request([])
        req.inputs.append(media)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await run(cluster, req)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (expected, info.value)
        assert expected in (info.value.details() or ""), info.value.details()


async def test_sigkill_mid_stream_of_a_media_request_resumes_token_for_token(
    cluster: LocalCluster,
) -> None:
    undisturbed = ids(await run(cluster, request([SINE], RESUME_TOKENS)))
    assert len(undisturbed) == RESUME_TOKENS
    got: list[int] = []
    attempts: list[int] = []
    nodes: list[str] = []
    killed = False
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        req = request([SINE], RESUME_TOKENS)
        req.stream_interval = 1
        async for r in stub.Generate(req, timeout=300):
            got += r.token_ids
            if r.token_ids and (not attempts or attempts[-1] != r.attempt):
                attempts.append(r.attempt)
                nodes.append(r.node_id)
            if not killed and len(got) >= 4:
                killed = True
                victim = cluster.agents[int(r.node_id.rsplit("-", 1)[1])]
                await asyncio.to_thread(os.kill, victim.process.pid, signal.SIGKILL)
    assert attempts == [1, 2] and nodes[0] != nodes[1], (attempts, nodes)
    assert got == undisturbed
