"""The coordinator's OpenAI-compatible HTTP front door on real processes (sim engine): the
official ``openai`` client, raw SSE framing (aiohttp, curl), models and health, the error
statuses, failover mid-stream, two models, and ``--workers 2``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from node_agent.engines.sim import simulate
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.v1 import coordinator_pb2_grpc, generate_pb2
from tests.certs import CertificateAuthority
from tests.conftest import wait_until
from tests.test_tls import NODES, Pki, start_mtls_cluster

MakeCluster = Callable[..., LocalCluster]
# Slow enough that a stream is still running when the test acts on its first chunks.
SLOW_SIM = ["--sim-ttft-ms", "5", "--sim-itl-ms", "40"]


def http_cluster(
    make_cluster: MakeCluster, tmp_path: Path, nodes: int, *extra: str, **kwargs: Any
) -> tuple[LocalCluster, str]:
    """A cluster whose coordinator serves HTTP too; returns it and the base URL."""
    port_file = tmp_path / f"http-{len(list(tmp_path.glob('http-*')))}.port"
    args = ["--http-listen", "127.0.0.1:0", "--http-port-file", str(port_file), *extra]
    cluster = make_cluster(nodes, coordinator_args=args, **kwargs)
    wait_until(port_file.exists, 30, "the HTTP port file")
    return cluster, f"http://127.0.0.1:{int(port_file.read_text())}"


def client_of(url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    # No retries: every status the front door gives is what the test must see.
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)


async def grpc_generate(
    address: str, request: generate_pb2.GenerateRequest
) -> tuple[str, generate_pb2.GenerateResponse]:
    """The gRPC path's text and last response for ``request``."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        text, last = [], generate_pb2.GenerateResponse()
        async for response in stub.Generate(request, timeout=30):
            text.append(response.text)
            last = response
    return "".join(text), last


def nodes(cluster: LocalCluster) -> dict[str, Any]:
    client = CoordinatorClient(cluster.coordinator_address, security=cluster.client_security())
    try:
        return {n.node_id: n for n in client.nodes()}
    finally:
        client.close()


@pytest.fixture
async def two_nodes(
    make_cluster: MakeCluster, tmp_path: Path
) -> AsyncIterator[tuple[LocalCluster, str]]:
    yield http_cluster(make_cluster, tmp_path, 2)


CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "name"}, {"type": "text", "text": "a"}]},
]


def chat_request(max_tokens: int, seed: int) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(
        messages=[
            generate_pb2.ChatMessage(role="system", content="be brief"),
            generate_pb2.ChatMessage(
                role="user",
                parts=[generate_pb2.ContentPart(text="name"), generate_pb2.ContentPart(text="a")],
            ),
        ]
    )
    request.sampling.max_tokens = max_tokens
    request.sampling.seed = seed
    return request


async def test_completions_and_chat_equal_the_grpc_path(
    two_nodes: tuple[LocalCluster, str],
) -> None:
    cluster, url = two_nodes
    prompt, seed = "the quick brown fox", 11
    request = generate_pb2.GenerateRequest(prompt=prompt)
    request.sampling.max_tokens = 12
    request.sampling.seed = seed
    grpc_text, grpc_last = await grpc_generate(cluster.coordinator_address, request)
    assert grpc_text == simulate(prompt, max_tokens=12, seed=seed).text
    async with client_of(url) as client:
        done = await client.completions.create(model="sim", prompt=prompt, max_tokens=12, seed=seed)
        assert done.choices[0].text == grpc_text
        assert done.choices[0].finish_reason == "length"
        assert done.model == "sim" and done.object == "text_completion"
        assert done.id.startswith("cmpl-")
        assert done.usage is not None
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (
            grpc_last.usage.prompt_tokens,
            grpc_last.usage.completion_tokens,
        )
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

        streamed = await client.completions.create(
            model="sim", prompt=prompt, max_tokens=12, seed=seed, stream=True
        )
        chunks = [chunk async for chunk in streamed]
        assert "".join(c.choices[0].text for c in chunks) == grpc_text
        assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
        assert {c.id for c in chunks} == {chunks[0].id}

        # Token ids as the prompt, as the gRPC path takes them.
        ids = await client.completions.create(model="sim", prompt=[5, 6, 7], max_tokens=4)
        assert ids.choices[0].text == simulate(prompt_token_ids=[5, 6, 7], max_tokens=4).text
        assert ids.usage is not None and ids.usage.prompt_tokens == 3

        chat_text, chat_last = await grpc_generate(
            cluster.coordinator_address, chat_request(9, seed)
        )
        chat = await client.chat.completions.create(
            model="sim",
            messages=CHAT,
            max_completion_tokens=9,
            seed=seed,
        )
        assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == chat_text
        assert chat.usage is not None
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
            chat_last.usage.prompt_tokens,
            chat_last.usage.completion_tokens,
        )

        stream = await client.chat.completions.create(
            model="sim",
            messages=CHAT,
            max_tokens=9,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = [chunk async for chunk in stream]
        assert parts[0].choices[0].delta.role == "assistant"
        assert all(p.usage is None for p in parts[:-1])
        # include_usage: a last chunk with no choices and the whole call's usage.
        assert parts[-1].choices == [] and parts[-1].usage is not None
        assert parts[-1].usage.completion_tokens == chat_last.usage.completion_tokens
        assert parts[-1].usage.prompt_tokens == chat_last.usage.prompt_tokens
        assert parts[-2].choices[0].finish_reason == "length"
        assert "".join(p.choices[0].delta.content or "" for p in parts[:-1]) == chat_text


async def test_raw_sse_framing(two_nodes: tuple[LocalCluster, str]) -> None:
    _, url = two_nodes
    body = {"prompt": "framing", "max_tokens": 5, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/completions", json=body) as response,
    ):
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = (await response.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert (
        "".join(c["choices"][0]["text"] for c in chunks) == simulate("framing", max_tokens=5).text
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
async def test_curl_streams_sse(two_nodes: tuple[LocalCluster, str]) -> None:
    _, url = two_nodes
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True})
    done = await asyncio.to_thread(
        subprocess.run,
        [
            "curl",
            "-sS",
            "-N",
            f"{url}/v1/chat/completions",
            "-H",
            "content-type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("data: {") and done.stdout.endswith("data: [DONE]\n\n")
    first = json.loads(done.stdout.split("\n\n")[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


async def test_models_and_health(two_nodes: tuple[LocalCluster, str]) -> None:
    _, url = two_nodes
    async with client_of(url) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["sim"]
        assert (models.data[0].model_extra or {})["healthy_nodes"] == 2
        one = await client.models.retrieve("sim")
        assert one.id == "sim"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nothing")
    async with aiohttp.ClientSession() as session, session.get(f"{url}/health") as response:
        assert response.status == 200
        assert (await response.json())["healthy_nodes"] == 2


async def test_errors_have_openai_shape_and_status(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster, url = http_cluster(
        make_cluster, tmp_path, 1, "--max-streams-per-client", "1", agent_args=SLOW_SIM
    )
    async with client_of(url) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model="sim", prompt="x", n=2)
        assert bad.value.body is not None and bad.value.body["param"] == "n"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model="sim", prompt="x", temperature=-1)
        assert "temperature" in bad.value.message
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model="sim", prompt="x", logprobs=2)
        assert "logprobs" in bad.value.message
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="sim",
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ],
            )
        assert "only data: URLs are supported" in bad.value.message
        with pytest.raises(openai.NotFoundError) as missing:
            await client.completions.create(model="nope", prompt="x")
        assert "model 'nope' is not served here; served: sim" in missing.value.message

        # One stream in flight for this client: the second is over --max-streams-per-client.
        stream = await client.completions.create(
            model="sim", prompt="long", max_tokens=1000, stream=True
        )
        await anext(aiter(stream))
        with pytest.raises(openai.RateLimitError) as limited:
            await client.completions.create(model="sim", prompt="x", max_tokens=2)
        assert "max_streams_per_client=1" in limited.value.message
        assert limited.value.response.headers["x-should-retry"] == "false"
        # The client goes away: the request is cancelled on its node (it had 40 s to go).
        await stream.close()
        wait_until(lambda: all(n.in_flight == 0 for n in nodes(cluster).values()), 10, "node freed")
        assert (await client.completions.create(model="sim", prompt="x", max_tokens=2)).choices

    # A caller's deadline (x-request-timeout) that runs out: 504.
    async with aiohttp.ClientSession() as session:
        body = {"prompt": "slow", "max_tokens": 500}
        headers = {"x-request-timeout": "0.3"}
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as response:
            assert response.status == 504
            error = (await response.json())["error"]
            assert error["code"] == "DEADLINE_EXCEEDED" and error["type"] == "timeout_error"
        async with session.post(
            f"{url}/v1/completions", data=b"{not json", headers={"content-type": "application/json"}
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "invalid_json"


async def test_no_node_is_503(make_cluster: MakeCluster, tmp_path: Path) -> None:
    _, url = http_cluster(make_cluster, tmp_path, 0, "--no-node-wait", "0.2", wait=False)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/health") as response:
            assert response.status == 503
            assert (await response.json())["status"] == "unavailable"
    async with client_of(url) as client:
        with pytest.raises(openai.InternalServerError) as unavailable:
            await client.completions.create(model="sim", prompt="x")
        assert unavailable.value.status_code == 503
        assert "no healthy nodes available" in unavailable.value.message


async def test_tokens_and_roles(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster, url = http_cluster(make_cluster, tmp_path, 1, auth=True)
    for key, error in (
        ("not-a-token", openai.AuthenticationError),
        (cluster.tokens["node"], openai.PermissionDeniedError),
    ):
        async with client_of(url, key) as client:
            with pytest.raises(error):
                await client.completions.create(model="sim", prompt="x", max_tokens=2)
            with pytest.raises(error):
                await client.models.list()
    for role in ("client", "admin"):
        async with client_of(url, cluster.tokens[role]) as client:
            done = await client.completions.create(model="sim", prompt="x", max_tokens=2)
            assert done.choices[0].text == simulate("x", max_tokens=2).text
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/completions", json={"prompt": "x"}) as response:
            assert response.status == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert (await response.json())["error"]["type"] == "authentication_error"
        # Health stays open, as grpc.health.v1 is (--health-auth open).
        async with session.get(f"{url}/health") as response:
            assert response.status == 200


async def test_an_agent_killed_mid_stream_resumes_exactly(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster, url = http_cluster(make_cluster, tmp_path, 2, agent_args=SLOW_SIM)
    prompt, seed, max_tokens = "failover over http", 5, 40
    expected = simulate(prompt, max_tokens=max_tokens, seed=seed).text
    async with client_of(url) as client:
        undisturbed = await client.completions.create(
            model="sim", prompt=prompt, max_tokens=max_tokens, seed=seed
        )
        assert undisturbed.choices[0].text == expected
        stream = await client.completions.create(
            model="sim", prompt=prompt, max_tokens=max_tokens, seed=seed, stream=True
        )
        chunks = aiter(stream)
        text = [(await anext(chunks)).choices[0].text for _ in range(5)]
        serving = [
            node_id
            for node_id, n in (await asyncio.to_thread(nodes, cluster)).items()
            if n.in_flight
        ]
        assert len(serving) == 1
        victim = cluster.agents[int(serving[0].removeprefix("node-"))].process
        os.kill(victim.pid, signal.SIGKILL)
        last = None
        async for chunk in chunks:
            text.append(chunk.choices[0].text)
            last = chunk
        assert last is not None and last.choices[0].finish_reason == "length"
    assert "".join(text) == expected
    assert victim.wait(timeout=10) == -signal.SIGKILL
    survivor = nodes(cluster)
    assert survivor[serving[0]].failures >= 1


async def test_two_models_each_served_by_its_nodes(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    per_agent = {
        0: ["--model", "alpha"],
        1: ["--model", "alpha"],
        2: ["--model", "beta", "--model-alias", "b"],
        3: ["--model", "beta", "--model-alias", "b"],
    }
    cluster, url = http_cluster(make_cluster, tmp_path, 4, per_agent_args=per_agent)
    by_model = {"alpha": {"node-0", "node-1"}, "beta": {"node-2", "node-3"}}
    async with client_of(url) as client:
        listed = {m.id: m.model_extra or {} for m in (await client.models.list()).data}
        assert set(listed) == {"alpha", "beta"}
        assert listed["beta"]["aliases"] == ["b"] and listed["beta"]["healthy_nodes"] == 2
        for model, asked in (("alpha", "alpha"), ("beta", "b")):
            before = {k: n.served for k, n in nodes(cluster).items()}
            for i in range(6):
                prompt = f"{model} {i}"
                done = await client.completions.create(model=asked, prompt=prompt, max_tokens=4)
                assert done.choices[0].text == simulate(prompt, max_tokens=4).text
                assert done.model == model  # the served model, an alias resolved
            after = {k: n.served for k, n in nodes(cluster).items()}
            grew = {k for k in after if after[k] > before.get(k, 0)}
            assert grew and grew <= by_model[model], (model, grew)
            assert sum(after[k] - before.get(k, 0) for k in after) == 6
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.completions.create(model="gamma", prompt="x")
        assert "served: alpha, beta" in unknown.value.message
        with pytest.raises(openai.BadRequestError) as unnamed:
            await client.completions.create(model="", prompt="x")
        assert "several models" in unnamed.value.message


def log_lines(cluster: LocalCluster, event: str) -> list[dict[str, Any]]:
    """The coordinator's (and its workers') JSON log lines of ``event``."""
    assert cluster.coordinator is not None
    lines = [json.loads(line) for line in cluster.coordinator.log_path.read_text().splitlines()]
    return [line for line in lines if line.get("event") == event]


async def test_workers_share_the_http_port(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster, url = http_cluster(make_cluster, tmp_path, 2, "--workers", "2")
    port = url.rsplit(":", 1)[1]
    serving = wait_until(
        lambda: len(found := log_lines(cluster, "worker serving")) == 2 and found, 10, "workers"
    )
    assert {line["http_address"] for line in serving} == {f"127.0.0.1:{port}"}
    assert log_lines(cluster, "coordinator serving")[0]["http_address"] == f"127.0.0.1:{port}"

    async def one(i: int) -> str:
        # A connection of its own each: the kernel hands connections to the workers.
        async with client_of(url) as client:
            done = await client.completions.create(model="sim", prompt=f"w {i}", max_tokens=3)
            return done.choices[0].text

    texts = await asyncio.gather(*(one(i) for i in range(40)))
    assert texts == [simulate(f"w {i}", max_tokens=3).text for i in range(40)]

    def finished() -> list[dict[str, Any]]:
        return [line for line in log_lines(cluster, "request finished") if line["status"] == "OK"]

    # Request lines are written off the event loop, a few milliseconds after the request.
    lines = wait_until(lambda: len(found := finished()) == 40 and found, 10, "request lines")
    # Both workers took connections (40 of them: the chance of one worker getting all is nil).
    assert {line["worker"] for line in lines} == {0, 1}
    async with client_of(url) as client:
        stream = await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
        assert len([c async for c in stream]) == 4
        assert [m.id for m in (await client.models.list()).data] == ["sim"]
    async with aiohttp.ClientSession() as session, session.get(f"{url}/health") as response:
        assert response.status == 200


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A CA and certificates for the coordinator, node-0, node-1 and a client (as
    tests/test_tls.py makes them; its other CA is not used here)."""
    ca = CertificateAuthority(tmp_path / "pki", "omni-test-ca")
    client = ca.issue("client", "test-client", dns=(), ips=())
    return Pki(
        ca=ca,
        coordinator=ca.issue("coordinator", "omni-coordinator"),
        nodes={n: ca.issue(n, n, dns=(n, "localhost")) for n in NODES},
        client=client,
        other_ca=ca,
        other_node=client,
        other_client=client,
    )


async def test_https_with_the_coordinators_certificate(
    make_cluster: MakeCluster, pki: Pki, tmp_path: Path
) -> None:
    """With TLS on the gRPC port, the HTTP port serves the same certificate, and with
    --require-client-cert it refuses clients without one of the CA's."""
    port_file = tmp_path / "https.port"

    def with_http(*args: Any, **kwargs: Any) -> LocalCluster:
        extra = ["--http-listen", "127.0.0.1:0", "--http-port-file", str(port_file)]
        kwargs["coordinator_args"] = [*kwargs["coordinator_args"], *extra]
        return make_cluster(*args, **kwargs)

    start_mtls_cluster(with_http, pki, [pki.nodes[n] for n in NODES])
    url = f"https://127.0.0.1:{int(port_file.read_text())}"
    trusted = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    with_cert = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    with_cert.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    async with aiohttp.ClientSession() as session:
        body = {"prompt": "tls", "max_tokens": 3}
        async with session.post(f"{url}/v1/completions", json=body, ssl=with_cert) as response:
            assert response.status == 200
            text = (await response.json())["choices"][0]["text"]
            assert text == simulate("tls", max_tokens=3).text
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"{url}/health", ssl=trusted) as response:
                await response.read()


async def test_sigterm_lets_a_stream_finish(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster, url = http_cluster(make_cluster, tmp_path, 1, agent_args=SLOW_SIM)
    assert cluster.coordinator is not None
    coordinator = cluster.coordinator.process
    async with client_of(url) as client:
        stream = await client.completions.create(
            model="sim", prompt="grace", max_tokens=30, stream=True
        )
        chunks = aiter(stream)
        text = [(await anext(chunks)).choices[0].text]
        coordinator.send_signal(signal.SIGTERM)
        text += [chunk.choices[0].text async for chunk in chunks]
    # Within --shutdown-grace the stream ran to its end, and the coordinator then exited.
    assert "".join(text) == simulate("grace", max_tokens=30).text
    assert await asyncio.to_thread(coordinator.wait, 30) == 0
