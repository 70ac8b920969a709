"""Chats and model limits on real processes with simulated engines: a chat through a real
coordinator is the simulated model's rendered prompt, a request beyond the context is
INVALID_ARGUMENT (final: no other node is tried), and an agent given a model it cannot find
exits at once with one clear message. The same with vLLM and a real model: tests/test_vllm.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from node_agent.engine import ChatTurn
from node_agent.engines.sim import render_chat, simulate
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.v1 import coordinator_pb2, coordinator_pb2_grpc, generate_pb2
from tests.conftest import FAST_SIM

MakeCluster = Callable[..., LocalCluster]
ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 64


def chat_request(
    turns: list[tuple[str, str]], max_tokens: int | None = None
) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(
        messages=[generate_pb2.ChatMessage(role=role, content=content) for role, content in turns]
    )
    if max_tokens is not None:
        request.sampling.max_tokens = max_tokens
    return request


async def collect(
    stub: coordinator_pb2_grpc.CoordinatorAsyncStub, request: generate_pb2.GenerateRequest
) -> list[generate_pb2.GenerateResponse]:
    return [r async for r in stub.Generate(request, timeout=30)]


async def test_a_chat_and_a_context_overflow_through_a_coordinator(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(2, agent_args=[*FAST_SIM, "--sim-max-model-len", str(CONTEXT)])
    turns = [("system", "Be brief."), ("user", "What is the capital of France?")]
    expected = simulate(messages=[ChatTurn(r, c) for r, c in turns], max_tokens=12)
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        responses = await collect(stub, chat_request(turns, 12))
        assert "".join(r.text for r in responses) == expected.text
        assert [t for r in responses for t in r.token_ids] == expected.token_ids
        last = responses[-1]
        assert last.finish_reason == "length"
        assert last.usage.prompt_tokens == expected.prompt_tokens == 11
        assert last.usage.completion_tokens == 12
        # Parts are joined with newlines, as content.
        parts = generate_pb2.GenerateRequest(sampling=generate_pb2.SamplingParams(max_tokens=4))
        parts.messages.add(role="user").parts.add(text="a")
        parts.messages[0].parts.add(text="b")
        joined = simulate(render_chat([ChatTurn("user", "a\nb")]), max_tokens=4)
        assert [t for r in await collect(stub, parts) for t in r.token_ids] == joined.token_ids

        # 11 prompt tokens + 54 > 64: refused by the node, final (not retried elsewhere).
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await collect(stub, chat_request(turns, CONTEXT - 10))
        assert over.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            f"This model's maximum context length is {CONTEXT} tokens. However, you requested "
            f"{CONTEXT + 1} tokens (11 in the messages, {CONTEXT - 10} for the completion)"
        ) in (over.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as prompt_over:
            await collect(
                stub,
                generate_pb2.GenerateRequest(
                    prompt="word " * 60, sampling=generate_pb2.SamplingParams(max_tokens=5)
                ),
            )
        assert prompt_over.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "(60 in the prompt, 5 for the completion)" in (prompt_over.value.details() or "")
        # Exactly the context is fine; no max_tokens given: what the context leaves (53).
        fits = await collect(stub, chat_request(turns, CONTEXT - 11))
        assert fits[-1].usage.completion_tokens == CONTEXT - 11
        unset = await collect(stub, chat_request(turns))
        assert unset[-1].usage.completion_tokens == CONTEXT - 11
        assert unset[-1].finish_reason == "length"

        stats = await stub.GetStats(coordinator_pb2.GetStatsRequest())
        assert len(stats.healthy_nodes) == 2  # a refused request never hurts a node


def test_an_unknown_model_name_fails_at_once(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "PYTHONPATH": str(ROOT),
    }
    # Without --engine the engine follows the model: a real model's name means vLLM (never
    # simulated output under that name), so it fails the same way.
    for model, engine, expected in (
        ("smollm2", ["--engine", "vllm"], "not a hub id (ORG/NAME)"),
        ("HuggingFaceTB/no-such-model", [], "no hub access (HF_HUB_OFFLINE is set)"),
    ):
        began = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "node_agent",
                "--coordinator",
                "127.0.0.1:1",
                "--auth",
                "off",
                *engine,
                "--model",
                model,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        took = time.monotonic() - began
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "known: smollm2-135m-instruct" in done.stderr
        assert "Traceback" not in done.stderr
        # No engine is loaded and no hub retried (the interpreter's start is most of it).
        assert took < 30, took
