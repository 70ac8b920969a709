"""The real engine: vLLM (its CPU build here) with SmolLM2-135M-Instruct behind two agents.

One cluster serves the whole module (each engine takes tens of seconds to load on two cores);
the test that kills an agent runs last. The reference outputs come from vLLM called directly,
in a separate process, on the same model folder and settings (float32, which the agents get
from ``--dtype auto`` on CPU: they are not given a dtype).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from node_agent.cpus import parse_cpu_list
from node_agent.models import prepare
from omni_rpc import DistributedOrchestrator, GenerationError
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    generate_pb2,
    node_agent_pb2,
    node_agent_pb2_grpc,
)
from tests.conftest import agent_load, async_wait_until, node_address, wait_healthy, wait_until

pytestmark = [pytest.mark.timeout(1200)]

MODEL = "smollm2-135m-instruct"
# No --dtype: "auto" must be float32 on CPU (bfloat16, vLLM's own auto there, answers the
# chat question below with nonsense).
ENGINE_FLAGS = ["--max-model-len", "256", "--max-num-seqs", "8"]
PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea.",
    "List three colors:",
    "def fibonacci(n):",
]
MAX_TOKENS = 24
RESUME_PROMPT = "Tell me a short story about a robot who learns to paint."
RESUME_TOKENS = 40
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_TOKENS = 16
# 242 tokens: one whole 128-token block (vLLM's block size on CPU) to find in the prefix cache
# (the module's context of 256 tokens leaves no room for more). Unlike any other prompt here.
CACHED_PROMPT = (
    " ".join(f"Shelf {i} of the archive holds {i * 7 % 13} maps of river {i}." for i in range(14))
    + " Which shelf holds the most maps?"
)

REFERENCE = """
import json, sys
from vllm import LLM, SamplingParams
from node_agent.engines.vllm import VllmConfig, engine_args


def main():
    prompts, max_tokens, resume_prompt, resume_tokens, chat, chat_tokens = json.loads(sys.argv[1])
    cfg = VllmConfig(model=sys.argv[2], max_model_len=256, dtype="float32", max_num_seqs=8)
    args = engine_args(cfg)
    args.pop("disable_log_stats", None)
    llm = LLM(**args)
    out = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    long = llm.generate(
        [resume_prompt],
        SamplingParams(max_tokens=resume_tokens, temperature=0.0, ignore_eos=True),
    )
    # vLLM's own chat path, and the model's template rendered and tokenized by hand.
    chat_out = llm.chat(chat, SamplingParams(max_tokens=chat_tokens, temperature=0.0))
    tokenizer = llm.get_tokenizer()
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    cache = llm.llm_engine.vllm_config.cache_config
    print("REFERENCE " + json.dumps({
        "prefix_caching": bool(cache.enable_prefix_caching),
        "block_size": cache.block_size,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "chat_text": chat_out[0].outputs[0].text,
        "chat_ids": list(chat_out[0].outputs[0].token_ids),
        "chat_prompt_ids": list(chat_out[0].prompt_token_ids),
        "template_ids": tokenizer.encode(rendered, add_special_tokens=False),
        "texts": [o.outputs[0].text for o in out],
        "ids": [list(o.outputs[0].token_ids) for o in out],
        "resume_text": long[0].outputs[0].text,
        "resume_ids": list(long[0].outputs[0].token_ids),
    }))


if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return prepare(MODEL)


@pytest.fixture(scope="module")
def reference_run(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[str]]:
    """vLLM called directly (offline LLM API, its own process), started before the cluster so
    that it loads while the agents' engines do: loading is most of this module's time."""
    script = tmp_path_factory.mktemp("reference") / "reference.py"
    script.write_text(REFERENCE)
    run = subprocess.Popen(
        [
            sys.executable,
            str(script),
            json.dumps([PROMPTS, MAX_TOKENS, RESUME_PROMPT, RESUME_TOKENS, CHAT, CHAT_TOKENS]),
            str(model_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:
        yield run
    finally:
        if run.poll() is None:  # the module failed before the reference was read
            run.kill()
            run.communicate()


@pytest.fixture(scope="module")
def reference(reference_run: subprocess.Popen[str]) -> dict[str, Any]:
    """Greedy outputs of vLLM called directly."""
    stdout, stderr = reference_run.communicate(timeout=900)
    lines = [x for x in stdout.splitlines() if x.startswith("REFERENCE ")]
    assert reference_run.returncode == 0 and lines, stderr[-3000:]
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("REFERENCE "))
    return result


@pytest.fixture(scope="module")
def cluster(
    model_dir: Path,
    reference_run: subprocess.Popen[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        num_nodes=2,
        engine="vllm",
        model=MODEL,
        agent_args=ENGINE_FLAGS,
        health_check_interval=0.5,
        coordinator_args=["--health-check-timeout", "2"],
        http_listen="127.0.0.1:0",
        log_dir=tmp_path_factory.mktemp("vllm-cluster"),
    )
    try:
        cluster.start()
        wait_healthy(cluster, 2, timeout=900)
        yield cluster
    finally:
        cluster.stop()


def orchestrator(cluster: LocalCluster) -> DistributedOrchestrator:
    return DistributedOrchestrator(coordinator=cluster.coordinator_address, timeout=300)


async def test_greedy_output_equals_vllm_called_directly(
    cluster: LocalCluster, reference: dict[str, Any]
) -> None:
    orch = orchestrator(cluster)
    results = await orch.generate(PROMPTS, max_tokens=MAX_TOKENS, temperature=0.0)
    assert [r.text for r in results] == reference["texts"]
    assert [r.token_ids for r in results] == reference["ids"]
    assert {r.node_id for r in results} == {"node-0", "node-1"}  # both engines answered
    assert results[0].text.startswith(" Paris")
    for r in results:
        assert r.usage["completion_tokens"] == len(r.token_ids) and r.usage["prompt_tokens"] > 0
    await orch.aclose()


async def test_cancel_leaves_no_unfinished_request_in_vllm(cluster: LocalCluster) -> None:
    orch = orchestrator(cluster)
    stream = orch.stream("Count from one to a thousand:", max_tokens=200, ignore_eos=True)
    first = await anext(stream)
    address = node_address(cluster, first.node_id)
    before = await agent_load(address)
    assert before.running == 1  # vLLM's own count of unfinished requests
    await stream.aclose()

    async def drained() -> bool:
        load = await agent_load(address)
        return load.running == 0 and load.aborted == before.aborted + 1

    await async_wait_until(drained, 10.0, "vLLM to drop the cancelled request")
    await orch.aclose()


def log_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


async def chat(
    cluster: LocalCluster, messages: list[dict[str, str]], max_tokens: int
) -> list[generate_pb2.GenerateResponse]:
    request = generate_pb2.GenerateRequest(
        messages=[generate_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        return [r async for r in stub.Generate(request, timeout=300)]


async def test_a_chat_is_rendered_by_the_models_template_as_vllm_chat_does(
    cluster: LocalCluster, reference: dict[str, Any]
) -> None:
    responses = await chat(cluster, CHAT, CHAT_TOKENS)
    text = "".join(r.text for r in responses)
    ids = [t for r in responses for t in r.token_ids]
    assert "Paris" in text, text
    # vLLM's own LLM.chat: the same prompt tokens (its template rendered, no special tokens
    # added again) and the same answer, token for token.
    assert reference["chat_prompt_ids"] == reference["template_ids"]
    assert ids == reference["chat_ids"] and text == reference["chat_text"]
    assert responses[-1].usage.prompt_tokens == len(reference["template_ids"])
    assert responses[-1].usage.completion_tokens == len(ids)
    for agent in cluster.agents:
        started = [
            r for r in log_records(agent.log_path) if r.get("event") == "starting vLLM engine"
        ]
        assert started and started[-1]["dtype"] == "float32", started
        assert started[-1]["dtype_requested"] == "auto"


async def test_the_official_openai_client_gets_what_the_grpc_path_gets(
    cluster: LocalCluster, reference: dict[str, Any]
) -> None:
    """The `openai` package against the HTTP front door: completions and chat, streamed and
    not, with the texts and usage counts of the gRPC path (and of vLLM called directly)."""
    from openai import AsyncOpenAI
    from openai.types.chat import ChatCompletionUserMessageParam

    OPENAI_CHAT = [ChatCompletionUserMessageParam(role="user", content=CHAT[0]["content"])]

    orch = orchestrator(cluster)
    via_grpc = await orch.generate(PROMPTS[:1], max_tokens=MAX_TOKENS, temperature=0.0)
    chat_grpc = await orch.chat(CHAT, max_tokens=CHAT_TOKENS, temperature=0.0)
    await orch.aclose()
    client = AsyncOpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0)
    try:
        listed = {m.id: m for m in (await client.models.list()).data}
        assert MODEL in listed, listed
        completion = await client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0
        )
        assert completion.choices[0].text == reference["texts"][0] == via_grpc[0].text
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == via_grpc[0].usage["prompt_tokens"]
        assert completion.usage.completion_tokens == len(reference["ids"][0])
        streamed, usage = "", None
        async for piece in await client.completions.create(
            model=MODEL,
            prompt=PROMPTS[0],
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            streamed += "".join(c.text for c in piece.choices)
            usage = piece.usage or usage
        assert streamed == reference["texts"][0]
        assert usage is not None and usage.completion_tokens == len(reference["ids"][0])

        answer = await client.chat.completions.create(
            model=MODEL,
            messages=OPENAI_CHAT,
            max_tokens=CHAT_TOKENS,
            temperature=0.0,
        )
        content = answer.choices[0].message.content or ""
        assert "Paris" in content and content == reference["chat_text"] == chat_grpc.text
        assert answer.usage is not None
        assert answer.usage.prompt_tokens == len(reference["template_ids"])
        assert answer.usage.prompt_tokens == chat_grpc.usage["prompt_tokens"]
        assert answer.usage.completion_tokens == chat_grpc.usage["completion_tokens"]
        pieces: list[str] = []
        async for chunk in await client.chat.completions.create(
            model=MODEL,
            messages=OPENAI_CHAT,
            max_tokens=CHAT_TOKENS,
            temperature=0.0,
            stream=True,
        ):
            pieces += [c.delta.content or "" for c in chunk.choices]
        assert "".join(pieces) == reference["chat_text"]
    finally:
        await client.close()


async def generate_on(address: str, prompt: str, max_tokens: int) -> generate_pb2.GenerateResponse:
    """The last response of ``prompt`` sent to the agent at ``address`` itself (NodeAgent)."""
    request = generate_pb2.GenerateRequest(
        prompt=prompt, sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = node_agent_pb2_grpc.NodeAgentStub(channel)
        first = node_agent_pb2.AgentRequest(generate=request, attempt=1)
        responses = [r async for r in stub.Generate(iter([first]), timeout=300)]
    assert responses and responses[-1].finish_reason, responses
    return responses[-1]


async def test_a_repeated_prefix_is_found_in_vllms_prefix_cache(
    cluster: LocalCluster, reference: dict[str, Any]
) -> None:
    """Each node advertises vLLM's prefix-cache block size and capacity; a prompt sent again to
    the same node reports its whole blocks as cached (gRPC usage, HTTP's
    prompt_tokens_details.cached_tokens), and GetLoad counts them."""
    from openai import AsyncOpenAI

    assert reference["prefix_caching"]  # vLLM's default
    block = reference["block_size"]
    assert block == 128  # vLLM's default on CPU
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        nodes = (await stub.ListNodes(coordinator_pb2.ListNodesRequest())).nodes
        assert len(nodes) == 2
        for node in nodes:
            assert node.cache_block_tokens == block, node
            assert node.cache_capacity_tokens == block * reference["num_gpu_blocks"] > 0, node
        addresses = [n.address for n in nodes]
        before = [await agent_load(a) for a in addresses]

        # Twice to each node itself: nothing cached the first time, the whole blocks the second
        # (vLLM computes the last prompt token again, so a prompt of k blocks exactly gets k-1).
        first = [await generate_on(a, CACHED_PROMPT, 4) for a in addresses]
        prompt_tokens = first[0].usage.prompt_tokens
        assert 2 * block > prompt_tokens > block
        expected = (prompt_tokens - 1) // block * block
        assert [r.usage.cached_prompt_tokens for r in first] == [0, 0]
        second = [await generate_on(a, CACHED_PROMPT, 4) for a in addresses]
        assert [r.usage.cached_prompt_tokens for r in second] == [expected, expected]
        assert [r.token_ids for r in second] == [r.token_ids for r in first]

        # Through the coordinator (both nodes hold the prefix now): gRPC and HTTP.
        request = generate_pb2.GenerateRequest(
            prompt=CACHED_PROMPT,
            sampling=generate_pb2.SamplingParams(max_tokens=4, temperature=0.0),
        )
        responses = [r async for r in stub.Generate(request, timeout=300)]
        assert responses[-1].usage.cached_prompt_tokens == expected
        assert responses[-1].usage.prompt_tokens == prompt_tokens
    client = AsyncOpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0)
    try:
        completion = await client.completions.create(
            model=MODEL, prompt=CACHED_PROMPT, max_tokens=4, temperature=0.0
        )
    finally:
        await client.close()
    assert completion.usage is not None and completion.usage.prompt_tokens == prompt_tokens
    details = completion.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == expected

    # GetLoad's lifetime counters: the prompt vLLM saw and its cached tokens, per request.
    after = [await agent_load(a) for a in addresses]
    prompt_sum = sum(a.prompt_tokens - b.prompt_tokens for a, b in zip(after, before, strict=True))
    cached_sum = sum(
        a.cached_prompt_tokens - b.cached_prompt_tokens for a, b in zip(after, before, strict=True)
    )
    assert (prompt_sum, cached_sum) == (6 * prompt_tokens, 4 * expected)


def one_second_of_silence() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(16000)
        writer.writeframes(b"\0\0" * 16000)
    return buffer.getvalue()


async def test_a_text_only_model_refuses_audio_naming_the_modality_and_the_model(
    cluster: LocalCluster,
) -> None:
    """SmolLM2 takes no audio: its agents advertise no input modality, and an audio input is
    refused (never dropped, never answered as if it had been heard)."""
    request = generate_pb2.GenerateRequest(
        prompt="What do you hear?",
        inputs=[generate_pb2.Media(mime_type="audio/wav", data=one_second_of_silence())],
        sampling=generate_pb2.SamplingParams(max_tokens=4),
    )
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        nodes = await stub.ListNodes(coordinator_pb2.ListNodesRequest())
        assert [list(n.input_modalities) for n in nodes.nodes] == [[], []]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Generate(request, timeout=60):
                pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert "audio" in details and MODEL in details, details


def test_each_agent_binds_vllms_threads_to_its_own_cores(cluster: LocalCluster) -> None:
    """Where the agents were given --cpu-cores (the local launcher does on CPU hosts), vLLM's
    OpenMP threads are bound to exactly those cores, and no two agents share one."""
    bound: list[list[int]] = []
    for agent in cluster.agents:
        text = agent.log_path.read_text(errors="replace")
        started = [
            r for r in log_records(agent.log_path) if r.get("event") == "starting vLLM engine"
        ]
        bind = started[-1]["cpu_threads_bind"]
        vllm_cores = re.findall(r"local_rank=0, core ids=\[([0-9, ]*)\]", text)
        assert vllm_cores, text[-3000:]
        cores = [int(c) for c in vllm_cores[-1].split(",") if c.strip()]
        if bind != "auto":
            assert cores == list(parse_cpu_list(bind)), (bind, cores)
            bound.append(cores)
    if len(bound) == len(cluster.agents) and len(os.sched_getaffinity(0)) >= len(bound):
        flat = [c for cores in bound for c in cores]
        assert len(flat) == len(set(flat)), bound


async def test_prompt_longer_than_the_context_is_invalid_argument(cluster: LocalCluster) -> None:
    orch = orchestrator(cluster)
    with pytest.raises(GenerationError) as info:
        await orch.generate(["hello " * 400], max_tokens=8)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum context length is 256" in info.value.message
    # A prompt that fits, with a max_tokens that does not: refused (vLLM alone would clamp
    # max_tokens), naming both numbers and the limit.
    with pytest.raises(GenerationError) as over:
        await orch.generate(["hello " * 200], max_tokens=100)
    assert over.value.code == grpc.StatusCode.INVALID_ARGUMENT
    found = re.search(
        r"This model's maximum context length is 256 tokens\. However, you requested (\d+) "
        r"tokens \((\d+) in the prompt, 100 for the completion\)",
        over.value.message,
    )
    assert found, over.value.message
    prompt_tokens = int(found[2])
    assert prompt_tokens < 256 and int(found[1]) == prompt_tokens + 100
    with pytest.raises(grpc.aio.AioRpcError) as chat_over:
        await chat(cluster, [{"role": "user", "content": "hello " * 200}], 100)
    assert chat_over.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum context length is 256 tokens" in (chat_over.value.details() or "")
    assert "in the messages, 100 for the completion" in (chat_over.value.details() or "")
    stats = orch.get_stats()
    assert stats["healthy_nodes"] == ["node-0", "node-1"]
    ok = await orch.generate(["The capital of France is"], max_tokens=4, temperature=0.0)
    assert ok[0].text.startswith(" Paris")
    await orch.aclose()


async def test_dead_engine_core_fails_over_and_the_agent_reports_not_serving(
    cluster: LocalCluster, reference: dict[str, Any]
) -> None:
    """The vLLM engine-core process dies inside a live agent."""
    orch = orchestrator(cluster)
    text, ids = "", []
    nodes: list[str] = []
    victim_index = -1
    async for delta in orch.stream(
        RESUME_PROMPT, max_tokens=RESUME_TOKENS, temperature=0.0, ignore_eos=True
    ):
        text += delta.text
        ids += delta.token_ids
        if not nodes or nodes[-1] != delta.node_id:
            nodes.append(delta.node_id)
        if victim_index < 0 and len(ids) >= 5:
            victim_index = int(delta.node_id.rsplit("-", 1)[1])
            agent = psutil.Process(cluster.agents[victim_index].process.pid)
            cores = [
                c
                for c in agent.children(recursive=True)
                if "EngineCore" in c.name() + " ".join(c.cmdline())
            ]
            assert cores, [c.name() for c in agent.children(recursive=True)]
            for core in cores:
                core.kill()
    assert len(nodes) == 2 and ids == reference["resume_ids"] and text == reference["resume_text"]
    victim = cluster.agents[victim_index]
    assert victim.alive  # the agent itself lives on, reporting NOT_SERVING
    wait_until(
        lambda: f"node-{victim_index}" in orch.get_stats()["unhealthy_nodes"],
        30.0,
        "the node with the dead engine to be unhealthy",
    )
    info = orch.get_stats()["health_stats"][f"node-{victim_index}"]
    assert "NOT_SERVING" in info["state_reason"] or "failed" in info["state_reason"]
    # Replace the broken agent so the next test has two engines again.
    victim.process.terminate()
    victim.process.wait(60)
    cluster.start_agent(victim_index)
    wait_healthy(cluster, 2, timeout=900)
    await orch.aclose()


async def test_sigkill_mid_stream_resumes_with_the_undisturbed_text(
    cluster: LocalCluster, reference: dict[str, Any]
) -> None:
    orch = orchestrator(cluster)
    text, ids = "", []
    attempts: list[int] = []
    nodes: list[str] = []
    killed = False
    engine_procs: list[psutil.Process] = []
    async for delta in orch.stream(
        RESUME_PROMPT, max_tokens=RESUME_TOKENS, temperature=0.0, ignore_eos=True
    ):
        text += delta.text
        ids += delta.token_ids
        if not attempts or attempts[-1] != delta.attempt:
            attempts.append(delta.attempt)
            nodes.append(delta.node_id)
        if not killed and len(ids) >= 5:
            killed = True
            victim = cluster.agents[int(delta.node_id.rsplit("-", 1)[1])]
            engine_procs = psutil.Process(victim.process.pid).children(recursive=True)
            await asyncio.to_thread(os.kill, victim.process.pid, signal.SIGKILL)
    assert attempts == [1, 2] and nodes[0] != nodes[1]
    assert ids == reference["resume_ids"]
    assert text == reference["resume_text"]
    wait_until(
        lambda: nodes[0] in orch.get_stats()["unhealthy_nodes"], 10.0, "the killed node unhealthy"
    )

    def engine_gone() -> bool:
        # vLLM's engine processes die with their agent (a zombie awaiting its reaper counts).
        return all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in engine_procs)

    assert engine_procs
    wait_until(engine_gone, 30.0, "the killed agent's vLLM processes to exit")
    await orch.aclose()


def test_bad_model_path_fails_at_start_up_with_a_clear_message(tmp_path: Path) -> None:
    for model, expected in (
        (str(tmp_path / "missing"), "does not exist"),
        (str(tmp_path), "no config.json"),
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "node_agent",
                "--coordinator",
                "127.0.0.1:1",
                "--auth",
                "off",
                "--engine",
                "vllm",
                "--model",
                model,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2
        assert expected in done.stderr and "Traceback" not in done.stderr
