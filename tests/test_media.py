"""Media inputs on real processes (sim agents): routing by modality, refusals, the media limit,
and the OpenAI-compatible front door with an input_audio part; with 1 and 2 coordinator
workers.

The cluster: node-0 takes image, audio and video (the default), node-1 only images
(``--sim-input-modalities image``), both serving ``sim``; node-2 serves ``pics`` and takes
images only.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import grpc
import openai
import pytest

from node_agent.engine import MediaInput
from node_agent.engines.sim import simulate
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.v1 import coordinator_pb2, coordinator_pb2_grpc, generate_pb2

MakeCluster = Callable[..., LocalCluster]
PROMPT = "what do you hear"
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64))
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(32))
MEDIA_LIMIT = 4096


def request(
    *media: tuple[str, bytes], model: str = "sim", max_tokens: int = 6
) -> generate_pb2.GenerateRequest:
    r = generate_pb2.GenerateRequest(prompt=PROMPT, model=model)
    r.sampling.max_tokens = max_tokens
    for mime, data in media:
        r.inputs.add(mime_type=mime, data=data)
    return r


async def collect(
    stub: coordinator_pb2_grpc.CoordinatorAsyncStub, r: generate_pb2.GenerateRequest
) -> list[generate_pb2.GenerateResponse]:
    return [x async for x in stub.Generate(r, timeout=30)]


@pytest.mark.parametrize("workers", [1, 2])
async def test_media_inputs_route_by_modality(make_cluster: MakeCluster, workers: int) -> None:
    cluster = make_cluster(
        3,
        http_listen="127.0.0.1:0",
        coordinator_args=["--workers", str(workers), "--max-media-bytes", str(MEDIA_LIMIT)],
        per_agent_args={
            1: ["--sim-input-modalities", "image"],
            2: ["--model", "pics", "--sim-input-modalities", "image"],
        },
    )
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        nodes = (await stub.ListNodes(coordinator_pb2.ListNodesRequest())).nodes
        takes = {n.node_id: list(n.input_modalities) for n in nodes}
        assert takes == {
            "node-0": ["image", "audio", "video"],
            "node-1": ["image"],
            "node-2": ["image"],
        }
        assert {list(n.output_modalities) == ["audio", "image"] for n in nodes} == {True}

        # Audio goes to the one node of the model that takes it, every time.
        served = set()
        for _ in range(20):
            responses = await collect(stub, request(("audio/wav", WAV)))
            served |= {r.node_id for r in responses}
        assert served == {"node-0"}
        # Images go to either node of the model.
        images = set()
        for _ in range(20):
            images |= {r.node_id for r in await collect(stub, request(("image/png", PNG)))}
        assert images == {"node-0", "node-1"}

        # The output is the simulated model's, a function of the media.
        responses = await collect(stub, request(("audio/wav", WAV)))
        expected = simulate(PROMPT, max_tokens=6, inputs=[MediaInput("audio/wav", WAV)])
        assert [t for r in responses for t in r.token_ids] == expected.token_ids
        other = await collect(stub, request(("audio/wav", WAV[:-1] + b"\x00")))
        plain = await collect(stub, request())
        outputs = {tuple(t for r in rs for t in r.token_ids) for rs in (responses, other, plain)}
        assert len(outputs) == 3

        # A model whose nodes take no audio: refused, naming the modality and the model.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(stub, request(("audio/wav", WAV), model="pics"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model 'pics' does not take audio input (it takes: text, image)" in (
            refused.value.details() or ""
        )
        # Over the media limit.
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await collect(stub, request(("image/png", b"x" * (MEDIA_LIMIT + 1))))
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"max_media_bytes={MEDIA_LIMIT}" in (over.value.details() or "")

    # The OpenAI client, with an input_audio part.
    async with openai.AsyncOpenAI(
        base_url=cluster.http_url, api_key="unused", max_retries=0, timeout=60
    ) as client:
        answer = await client.chat.completions.create(
            model="sim",
            max_tokens=5,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "listen"},
                        {
                            "type": "input_audio",
                            "input_audio": {
                                "data": base64.b64encode(WAV).decode(),
                                "format": "wav",
                            },
                        },
                    ],
                }
            ],
        )
        assert answer.usage is not None and answer.usage.completion_tokens == 5
        assert answer.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="pics",
                max_tokens=5,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "input_audio",
                                "input_audio": {"data": "AAAA", "format": "wav"},
                            }
                        ],
                    }
                ],
            )
        assert "does not take audio input" in bad.value.message
