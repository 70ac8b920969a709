"""The SDK's front door on real processes (simulated engines): chat, the engine that follows
the model, a bounded connect, and the HTTP front door of a cluster the SDK starts."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from node_agent.engine import ChatTurn
from node_agent.engines.sim import render_chat, simulate
from omni_rpc import CoordinatorUnreachableError, DistributedOrchestrator, GenerationError, config
from omni_rpc.launchers.local import LaunchError
from tests.conftest import FAST_SIM
from tests.test_cli import free_port

CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Another"}, {"type": "text", "text": "one?"}],
    },
]
# What the serving node renders: text parts joined with newlines.
TURNS = (
    ChatTurn("system", "You are brief."),
    ChatTurn("user", "Name a colour."),
    ChatTurn("assistant", "Blue."),
    ChatTurn("user", "Another\none?"),
)


async def test_chat_and_stream_chat_on_a_cluster_the_sdk_started() -> None:
    async with DistributedOrchestrator(num_nodes=2, agent_args=FAST_SIM) as orch:
        # No model: the clearly labelled simulated model.
        assert (orch.engine, orch.model) == ("sim", "sim")
        expected = simulate("", max_tokens=12, seed=3, messages=TURNS)
        result = await orch.chat(CHAT, max_tokens=12, seed=3, temperature=0.0)
        assert result.text == expected.text and result.token_ids == expected.token_ids
        assert result.finish_reason == "length" and result.attempts == 1
        # The simulated engine counts the words of the chat as its template renders it.
        assert result.usage == {
            "prompt_tokens": len(render_chat(TURNS).split()),
            "completion_tokens": 12,
            "cached_prompt_tokens": 0,
        }
        deltas = [
            d
            async for d in orch.stream_chat(
                CHAT, max_tokens=12, seed=3, stream_interval=4, model="sim"
            )
        ]
        assert "".join(d.text for d in deltas) == expected.text
        assert [len(d.token_ids) for d in deltas] == [4, 4, 4]
        assert deltas[-1].finish_reason == "length" and deltas[-1].usage == result.usage
        # A model no node serves is the coordinator's NOT_FOUND, as for prompts.
        with pytest.raises(GenerationError) as info:
            await orch.chat(CHAT, max_tokens=4, model="Qwen/Qwen2.5-Omni-7B")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        # Malformed messages fail before any traffic.
        sent = orch.get_stats()["requests_total"]
        with pytest.raises(ValueError, match="file parts are not supported"):
            await orch.chat([{"role": "user", "content": [{"type": "file"}]}])
        with pytest.raises(TypeError, match="messages must be a list"):
            orch.stream_chat("Hi")  # type: ignore[arg-type]
        assert orch.get_stats()["requests_total"] == sent

        # The HTTP front door answers the same chat, OpenAI's way.
        assert orch.http_url is not None and orch.http_url.startswith("http://127.0.0.1:")
        assert orch.http_url.endswith("/v1")
        openai = pytest.importorskip("openai")
        client = openai.AsyncOpenAI(base_url=orch.http_url, api_key="unused")
        try:
            reply = await client.chat.completions.create(
                model="sim", messages=CHAT, max_tokens=12, seed=3, temperature=0.0
            )
        finally:
            await client.close()
        assert reply.choices[0].message.content == expected.text


async def test_an_orchestrator_of_a_running_coordinator_has_no_http_url_unless_given(
    make_cluster: Any,
) -> None:
    cluster = make_cluster(1)
    orch = DistributedOrchestrator(coordinator=cluster.coordinator_address)
    given = DistributedOrchestrator(
        coordinator=cluster.coordinator_address, http_url="http://10.0.0.1:8000/v1"
    )
    try:
        assert orch.http_url is None
        assert given.http_url == "http://10.0.0.1:8000/v1"
        expected = simulate("", max_tokens=5, messages=(ChatTurn("user", "Hi"),))
        assert (await orch.chat([{"role": "user", "content": "Hi"}], max_tokens=5)).text == (
            expected.text
        )
    finally:
        await orch.aclose()
        await given.aclose()


def test_a_real_model_name_never_gets_simulated_output() -> None:
    """No engine given and a model that is not "sim": the agents run vLLM, never the
    simulator; a model vLLM cannot load fails at once, naming it."""
    started = time.monotonic()
    with pytest.raises(LaunchError, match="'/no/such/omni-model' is neither a model folder"):
        DistributedOrchestrator(model="/no/such/omni-model", num_nodes=1)
    assert time.monotonic() - started < 5  # before any process started
    # A hub-style name that is not in the local cache (and no hub): the vLLM agent refuses it
    # at start-up; the orchestrator says so with the agent's log, and nothing was generated.
    started = time.monotonic()
    with pytest.raises(LaunchError) as info:
        with DistributedOrchestrator(model="omni-test-org/no-such-model", num_nodes=1) as orch:
            pytest.fail(f"a cluster started for a model that does not exist: {orch.get_stats()}")
    assert "omni-test-org/no-such-model" in str(info.value)
    assert "engine sim" not in str(info.value)
    assert time.monotonic() - started < 60


async def test_a_coordinator_never_reached_fails_within_connect_timeout() -> None:
    address = f"127.0.0.1:{free_port()}"  # nobody listens
    orch = DistributedOrchestrator(coordinator=address, connect_timeout=1)
    assert orch.connect_timeout == 1
    assert DistributedOrchestrator(coordinator=address).connect_timeout == (
        config.DEFAULT_CONNECT_TIMEOUT_S
    )
    try:
        started = time.monotonic()
        with pytest.raises(CoordinatorUnreachableError) as info:
            await orch.chat([{"role": "user", "content": "anyone?"}])
        # Bounded by connect_timeout, not by the request's 600 s deadline.
        assert time.monotonic() - started < orch.timeout / 10
        error = info.value
        assert address in str(error) and "connect_timeout" in str(error)
        assert error.waited_s == 1 and error.code == grpc.StatusCode.UNAVAILABLE
        assert isinstance(error, ConnectionError) and isinstance(error, GenerationError)
        with pytest.raises(ConnectionError, match=address):
            await orch.generate(["and you?"], max_tokens=4)
        with pytest.raises(ValueError, match="connect_timeout"):
            DistributedOrchestrator(coordinator=address, connect_timeout=0)
    finally:
        await orch.aclose()
