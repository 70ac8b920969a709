"""Media outputs on real processes (simulated engines): the SDK receives the documented WAV and
PNG, every item exactly once and whole through a SIGKILL of the serving agent mid-item, and the
OpenAI chat endpoint returns the audio as message.audio."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node_agent.engines.sim import sim_png, sim_wav, simulate
from omni_rpc import DistributedOrchestrator
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk.results import MediaOutput
from tests.test_fault_tolerance import agent_of, ft_cluster
from tests.test_http_api import client_of, http_cluster
from tests.unit.test_media_out import parse_png

MakeCluster = Callable[..., LocalCluster]
SECONDS, SIZE = 8.0, 128  # 16 + 4 pieces of 16 KiB
# A piece per 100 ms step: the audio item alone spans about 1.6 s.
MEDIA_SIM = [
    "--sim-ttft-ms",
    "5",
    "--sim-itl-ms",
    "100",
    "--sim-media-seconds",
    str(SECONDS),
    "--sim-image-size",
    str(SIZE),
]
PROMPT = "sing and paint"
MAX_TOKENS = 4


def check_items(outputs: list[MediaOutput], prompt: str = PROMPT) -> None:
    assert [(o.index, o.mime_type) for o in outputs] == [(0, "audio/wav"), (1, "image/png")]
    wav, png = outputs[0].data, outputs[1].data
    assert wav == sim_wav(prompt, seed=3, seconds=SECONDS)
    assert png == sim_png(prompt, seed=3, size=SIZE)
    with wave.open(io.BytesIO(wav)) as reader:
        assert reader.getnframes() == SECONDS * 16000
    assert parse_png(png)[:2] == (SIZE, SIZE)


async def test_the_sdk_receives_media_items_whole(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = ft_cluster(make_cluster, 1, agent_args=MEDIA_SIM)
    orch = DistributedOrchestrator(coordinator=cluster.coordinator_address, timeout=60)
    try:
        result = await orch.generate_one(
            PROMPT, max_tokens=MAX_TOKENS, seed=3, modalities=["text", "audio", "image"]
        )
        assert result.text == simulate(PROMPT, max_tokens=MAX_TOKENS, seed=3).text
        check_items(result.outputs)
        saved = await asyncio.to_thread(result.outputs[0].save, tmp_path)
        written = await asyncio.to_thread(Path(saved).read_bytes)
        assert saved.endswith("output-0.wav") and written == result.outputs[0].data
    finally:
        await orch.aclose()


@pytest.mark.parametrize("when", ["text_done", "audio_done"])
async def test_a_sigkill_mid_item_delivers_every_item_once_and_whole(
    make_cluster: MakeCluster, when: str
) -> None:
    """Killed as the text completes (the audio item is being produced: about 1.6 s of pieces
    follow) or as the audio item arrives (the image is being produced): the next node
    produces the items not delivered yet, whole, and none twice."""
    cluster = ft_cluster(make_cluster, 2, agent_args=MEDIA_SIM)
    orch = DistributedOrchestrator(coordinator=cluster.coordinator_address, timeout=60)
    killed: list[str] = []
    outputs: list[MediaOutput] = []
    token_ids: list[int] = []
    attempts: list[int] = []
    try:
        async for delta in orch.stream(
            PROMPT, max_tokens=MAX_TOKENS, seed=3, modalities=["text", "audio", "image"]
        ):
            token_ids += delta.token_ids
            outputs += delta.outputs
            attempts.append(delta.attempt)
            due = len(token_ids) == MAX_TOKENS if when == "text_done" else bool(delta.outputs)
            if due and not killed:
                os.kill(agent_of(cluster, delta.node_id), signal.SIGKILL)
                killed.append(delta.node_id)
        assert killed and max(attempts) == 2
        assert token_ids == simulate(PROMPT, max_tokens=MAX_TOKENS, seed=3).token_ids
        check_items(outputs)
    finally:
        await orch.aclose()


async def test_openai_chat_returns_the_audio(make_cluster: MakeCluster, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    cluster, url = http_cluster(make_cluster, tmp_path, 1, agent_args=MEDIA_SIM)
    del cluster
    client: Any = client_of(url)  # the typed client refuses "image", which is the test
    messages = [{"role": "user", "content": "Say something."}]
    reply = await client.chat.completions.create(
        model="sim",
        messages=messages,
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"},
        max_tokens=MAX_TOKENS,
        seed=3,
    )
    audio = reply.choices[0].message.audio
    assert audio is not None and audio.id and audio.expires_at > 0
    from node_agent.engine import ChatTurn

    turns = (ChatTurn("user", "Say something."),)
    assert base64.b64decode(audio.data) == sim_wav(seed=3, messages=turns, seconds=SECONDS)
    assert audio.transcript == simulate(max_tokens=MAX_TOKENS, seed=3, messages=turns).text
    # Streamed: a delta.audio chunk when the item completes.
    stream = await client.chat.completions.create(
        model="sim",
        messages=messages,
        modalities=["text", "audio"],
        max_tokens=MAX_TOKENS,
        seed=3,
        stream=True,
    )
    pieces = []
    async for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta.to_dict()
            if delta.get("audio"):
                pieces.append(delta["audio"])
    assert len(pieces) == 1
    assert base64.b64decode(pieces[0]["data"]) == sim_wav(seed=3, messages=turns, seconds=SECONDS)
    # Images are not an output of the chat API: refused, not dropped.
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="sim",
            messages=messages,
            modalities=["text", "image"],
            max_tokens=MAX_TOKENS,
        )
