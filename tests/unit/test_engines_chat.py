"""The node agent's side of chats and model limits, in process: the simulated engine's chat
rendering, the context-length refusal (``context_budget``), the vLLM engine's chat rendering
against a stand-in tokenizer, ``--dtype auto`` on CPU, model-name resolution without a hub,
and ``--cpu-cores``."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from node_agent import cpus, models
from node_agent.engine import ChatTurn, Delta, EngineRequest, context_budget
from node_agent.engines import vllm as vllm_engine
from node_agent.engines.sim import (
    DEFAULT_MAX_MODEL_LEN,
    SimConfig,
    SimEngine,
    render_chat,
    simulate,
    word,
)
from node_agent.main import build_parser
from node_agent.service import NodeAgentService
from node_agent.session import admit
from omni_rpc.v1 import generate_pb2, node_agent_pb2
from omni_rpc.validation import InvalidRequest, Sampling

CHAT = (
    ChatTurn("system", "You are terse."),
    ChatTurn("user", "What is the capital of France?"),
)


def request(
    prompt: str = "",
    *,
    max_tokens: int = 8,
    messages: Sequence[ChatTurn] = (),
    ids: Sequence[int] = (),
    resume: Sequence[int] = (),
    default_max_tokens: bool = False,
) -> EngineRequest:
    return EngineRequest(
        request_id="r-1",
        sampling=Sampling(max_tokens=max_tokens, temperature=0.0),
        prompt=prompt,
        prompt_token_ids=tuple(ids),
        messages=tuple(messages),
        resume_token_ids=tuple(resume),
        resume_text="".join(word(t) for t in resume),
        default_max_tokens=default_max_tokens,
    )


async def run(engine: SimEngine, req: EngineRequest) -> Delta:
    """Every delta of ``req`` merged into one."""
    total = Delta()
    async for delta in engine.generate(req):
        total.merge(delta)
    return total


def fast_sim(**kwargs: Any) -> SimEngine:
    return SimEngine(SimConfig(ttft_ms=0, itl_ms=0, **kwargs))


# -- the simulated engine's chat template ----------------------------------------------------


def test_sim_chat_rendering_is_the_documented_one() -> None:
    assert render_chat(CHAT) == (
        "<|system|>\nYou are terse.\n<|user|>\nWhat is the capital of France?\n<|assistant|>\n"
    )
    assert render_chat([]) == "<|assistant|>\n"


async def test_a_sim_chat_is_its_rendered_prompt() -> None:
    engine = fast_sim()
    await engine.start()
    chat = await run(engine, request(messages=CHAT, max_tokens=12))
    prompt = await run(engine, request(render_chat(CHAT), max_tokens=12))
    expected = simulate(render_chat(CHAT), max_tokens=12)
    assert simulate(messages=CHAT, max_tokens=12) == expected
    assert (chat.text, chat.token_ids, chat.finish_reason) == (
        expected.text,
        expected.token_ids,
        "length",
    )
    assert (chat.text, chat.token_ids, chat.prompt_tokens) == (
        prompt.text,
        prompt.token_ids,
        prompt.prompt_tokens,
    )
    # "<|system|>", "You", "are", "terse.", "<|user|>", 6 words, "<|assistant|>": 12 words
    assert chat.prompt_tokens == expected.prompt_tokens == 12
    # Another chat is another prompt.
    other = await run(engine, request(messages=[ChatTurn("user", "Hi")], max_tokens=12))
    assert other.token_ids != chat.token_ids


async def test_a_resumed_sim_chat_continues_the_undisturbed_output() -> None:
    engine = fast_sim()
    await engine.start()
    full = simulate(messages=CHAT, max_tokens=10)
    rest = await run(engine, request(messages=CHAT, max_tokens=10, resume=full.token_ids[:4]))
    assert full.token_ids[:4] + rest.token_ids == full.token_ids
    assert "".join(word(t) for t in full.token_ids[:4]) + rest.text == full.text
    assert rest.completion_tokens == 10 and rest.prompt_tokens == full.prompt_tokens


# -- context length: refused, not clamped ----------------------------------------------------


def test_context_budget_refuses_in_vllms_words() -> None:
    assert context_budget(request("x", max_tokens=6), 10, 16) == 6  # exactly the context
    assert context_budget(request("x", max_tokens=6), 10, None) == 6  # no limit known
    with pytest.raises(InvalidRequest) as raised:
        context_budget(request("x", max_tokens=7), 10, 16)
    assert str(raised.value) == (
        "prompt: This model's maximum context length is 16 tokens. However, you requested 17 "
        "tokens (10 in the prompt, 7 for the completion). Please reduce the length of the "
        "prompt or completion."
    )
    with pytest.raises(InvalidRequest) as chat:
        context_budget(request(messages=CHAT, max_tokens=7), 10, 16)
    assert chat.value.field == "messages" and "(10 in the messages, 7 for" in str(chat.value)


def test_a_default_max_tokens_gets_what_the_context_leaves() -> None:
    # max_tokens the server's default (the client gave none): lowered, as vLLM's server does.
    assert context_budget(request("x", max_tokens=64, default_max_tokens=True), 10, 16) == 6
    assert context_budget(request("x", max_tokens=4, default_max_tokens=True), 10, 16) == 4
    with pytest.raises(InvalidRequest, match="requested 80 tokens"):
        context_budget(request("x", max_tokens=64, default_max_tokens=True), 16, 16)


async def test_the_sim_refuses_a_request_beyond_its_context() -> None:
    engine = fast_sim(max_model_len=16)
    await engine.start()
    ten_words = " ".join(["w"] * 10)
    ok = await run(engine, request(ten_words, max_tokens=6))
    assert ok.finish_reason == "length" and len(ok.token_ids) == 6
    with pytest.raises(InvalidRequest, match=r"context length is 16 tokens.*requested 17 tokens"):
        await run(engine, request(ten_words, max_tokens=7))
    with pytest.raises(InvalidRequest, match=r"\(16 in the messages, 7 for the completion\)"):
        await run(engine, request(messages=(*CHAT, ChatTurn("user", "a b c")), max_tokens=7))
    with pytest.raises(InvalidRequest, match=r"\(12 in the prompt"):
        await run(engine, request(ids=range(12), max_tokens=6))
    # A resumed attempt counts the original prompt and max_tokens: the same answer.
    with pytest.raises(InvalidRequest, match="requested 17 tokens"):
        await run(engine, request(ten_words, max_tokens=7, resume=[1, 2, 3]))
    full = simulate(ten_words, max_tokens=6)
    rest = await run(engine, request(ten_words, max_tokens=6, resume=full.token_ids[:3]))
    assert full.token_ids[:3] + rest.token_ids == full.token_ids
    # A default max_tokens is lowered to what is left.
    short = await run(engine, request(ten_words, max_tokens=64, default_max_tokens=True))
    assert short.token_ids == simulate(ten_words, max_tokens=6).token_ids
    # Refusals are not engine work: nothing started, nothing failed.
    load = engine.load()
    assert (load.started, load.failed, load.running) == (3, 0, 0)
    assert fast_sim().cfg.max_model_len == DEFAULT_MAX_MODEL_LEN == 32768


def test_admit_marks_a_max_tokens_the_client_did_not_give() -> None:
    service = NodeAgentService(fast_sim(), "node-a", 1000)
    service.engine._healthy = True  # type: ignore[attr-defined]

    def admitted(sampling: generate_pb2.SamplingParams) -> EngineRequest:
        generate = generate_pb2.GenerateRequest(
            request_id="r",
            messages=[generate_pb2.ChatMessage(role="user", content="hi")],
            sampling=sampling,
        )
        return admit(service, node_agent_pb2.AgentRequest(generate=generate))

    unset = admitted(generate_pb2.SamplingParams())
    assert unset.default_max_tokens and unset.messages == (ChatTurn("user", "hi"),)
    assert not admitted(generate_pb2.SamplingParams(max_tokens=5)).default_max_tokens


def test_the_sim_context_length_is_a_flag() -> None:
    args = build_parser().parse_args(["--sim-max-model-len", "512"])
    assert args.sim_max_model_len == 512
    assert build_parser().parse_args([]).sim_max_model_len == 32768


# -- the vLLM engine's chat rendering (a stand-in tokenizer; the real one: tests/test_vllm.py)


class Tokenizer:
    """Records how it is called; "renders" a chat as role:content lines."""

    def __init__(self, template: str | None = "{{ messages }}", fail: bool = False) -> None:
        self.chat_template = template
        self.fail = fail
        self.calls: list[tuple[str, Any]] = []

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> str:
        self.calls.append(("apply_chat_template", kwargs))
        if self.fail:
            raise ValueError("Conversation roles must alternate user/assistant")
        return "<s>" + "".join(f"{m['role']}:{m['content']}\n" for m in conversation) + ">"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append(("encode", add_special_tokens))
        return ([0] if add_special_tokens else []) + [ord(c) for c in text]


def vllm_with(tokenizer: Tokenizer) -> vllm_engine.VllmEngine:
    engine = vllm_engine.VllmEngine(vllm_engine.VllmConfig(model="/models/tiny", served_name=""))
    engine._tokenizer = tokenizer
    return engine


def test_vllm_renders_a_chat_with_the_template_and_no_extra_special_tokens() -> None:
    tokenizer = Tokenizer()
    engine = vllm_with(tokenizer)
    ids = engine.prompt_ids(request(messages=CHAT))
    rendered = "<s>system:You are terse.\nuser:What is the capital of France?\n>"
    assert ids == [ord(c) for c in rendered]  # no special token added in front
    assert tokenizer.calls == [
        ("apply_chat_template", {"tokenize": False, "add_generation_prompt": True}),
        ("encode", False),
    ]
    # A text prompt is tokenized as vLLM's completion path does (special tokens added); token
    # ids are taken as they are.
    assert engine.prompt_ids(request("ab")) == [0, ord("a"), ord("b")]
    assert engine.prompt_ids(request(ids=[5, 6])) == [5, 6]


def test_vllm_refuses_a_chat_for_a_model_without_a_template() -> None:
    with pytest.raises(InvalidRequest) as raised:
        vllm_with(Tokenizer(template=None)).prompt_ids(request(messages=CHAT))
    assert raised.value.field == "messages"
    assert "model 'tiny' has no chat template" in str(raised.value)
    with pytest.raises(InvalidRequest, match="refused it: Conversation roles must alternate"):
        vllm_with(Tokenizer(fail=True)).prompt_ids(request(messages=CHAT))


# -- dtype -------------------------------------------------------------------------------------


def test_dtype_auto_is_float32_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert vllm_engine.resolve_dtype("auto", cuda=False) == "float32"
    assert vllm_engine.resolve_dtype("auto", cuda=True) == "auto"
    for explicit in ("bfloat16", "float16", "float32"):
        assert vllm_engine.resolve_dtype(explicit, cuda=False) == explicit
    monkeypatch.setattr(vllm_engine, "has_cuda", lambda: False)
    cfg = vllm_engine.VllmConfig(model="m")
    assert vllm_engine.engine_args(cfg)["dtype"] == "float32"
    cfg = vllm_engine.VllmConfig(model="m", dtype="bfloat16")
    assert vllm_engine.engine_args(cfg)["dtype"] == "bfloat16"


# -- model names -------------------------------------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The no-hub path, forced: offline, and an empty Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_an_unknown_name_fails_at_once_naming_the_known_ones(no_hub: None) -> None:
    with pytest.raises(models.ModelError) as bare:
        models.resolve("smollm2")
    assert str(bare.value) == (
        "unknown model 'smollm2': not a model folder, not a known name (known: "
        f"{', '.join(sorted(models.KNOWN))}) and not a hub id (ORG/NAME)"
    )
    with pytest.raises(models.ModelError) as hub_id:
        models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = str(hub_id.value)
    assert "known: smollm2-135m-instruct" in message
    assert "there is no hub access (HF_HUB_OFFLINE is set)" in message


def test_a_hub_id_is_tried_when_the_hub_is_reachable(
    no_hub: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert models.resolve("org/model", hub=lambda: None) == "org/model"
    monkeypatch.setattr(models, "in_hub_cache", lambda model: model == "org/cached")
    assert models.resolve("org/cached", hub=lambda: "unreachable") == "org/cached"
    with pytest.raises(models.ModelError, match=r"no hub access \(unreachable\)"):
        models.resolve("org/other", hub=lambda: "unreachable")


def test_hub_access_is_a_bounded_check(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "true")
    assert models.hub_access() == "TRANSFORMERS_OFFLINE is set"
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    # A port nobody listens on: the connect is refused at once.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    why = models.hub_access(timeout_s=2.0)
    assert why is not None and why.startswith(f"127.0.0.1:{port} cannot be reached")
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert models.hub_access(timeout_s=2.0) is None


def test_hub_access_bounds_a_lookup_that_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    release = threading.Event()

    def hang(address: tuple[str, int], timeout: float) -> socket.socket:
        release.wait(30)  # a name lookup that does not answer
        raise OSError("too late")

    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        began = time.monotonic()
        why = models.hub_access(timeout_s=0.2)
        assert time.monotonic() - began < 5
    finally:
        release.set()
    assert why == "huggingface.co:443 cannot be reached (no connection within 0.2 s)"


def test_folders_and_known_names_still_resolve(no_hub: None, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert models.resolve(str(folder)) == str(folder.resolve())
    with pytest.raises(models.ModelError, match="does not exist"):
        models.resolve(str(tmp_path / "missing"))


# -- --cpu-cores -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("0-3", (0, 1, 2, 3)),
        ("0,2", (0, 2)),
        ("1", (1,)),
        ("0-1,4", (0, 1, 4)),
        ("3,1,1", (1, 3)),
        (" 2 , 0 ", (0, 2)),
    ],
)
def test_cpu_cores_lists(text: str, cores: tuple[int, ...]) -> None:
    assert cpus.parse_cpu_list(text) == cores
    assert cpus.parse_cpu_list(cpus.format_cpu_list(cores)) == cores


@pytest.mark.parametrize("text", ["", "a", "3-1", "1-", "-1", "0,,1", "0-2-4", "1.5"])
def test_bad_cpu_cores_lists(text: str) -> None:
    with pytest.raises(ValueError):
        cpus.parse_cpu_list(text)
    with pytest.raises(argparse.ArgumentTypeError):
        cpus.cpu_list(text)


def test_cpu_cores_flag_and_its_check() -> None:
    assert build_parser().parse_args(["--cpu-cores", "0-1,4"]).cpu_cores == (0, 1, 4)
    assert build_parser().parse_args([]).cpu_cores is None
    assert cpus.format_cpu_list((0, 1, 2, 3, 6, 8, 9)) == "0-3,6,8-9"
    assert cpus.check((0, 1), allowed={0, 1, 2}) == (0, 1)
    with pytest.raises(ValueError) as raised:
        cpus.check((1, 5, 6), allowed={0, 1})
    assert str(raised.value) == (
        "--cpu-cores 1,5-6: core(s) 5-6 not available to this process (allowed: 0-1)"
    )


def test_pin_binds_every_thread_and_the_children() -> None:
    core = min(os.sched_getaffinity(0))
    script = f"""
import os, subprocess, sys, threading
from node_agent import cpus
started = threading.Event(); done = threading.Event()
seen = []
def before():
    started.set(); done.wait(); seen.append(os.sched_getaffinity(0))
thread = threading.Thread(target=before); thread.start(); started.wait()
cpus.pin(({core},))
done.set(); thread.join()
child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                       capture_output=True, text=True).stdout.strip()
print(sorted(os.sched_getaffinity(0)), sorted(seen[0]), child)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == [f"[{core}]"] * 3


def test_vllm_gets_the_cores_as_its_thread_binding() -> None:
    cfg = vllm_engine.VllmConfig(model="m", cpu_cores=(0, 1, 2, 5))
    assert vllm_engine.omp_threads_bind(cfg, cuda=False) == "0-2,5"
    assert vllm_engine.omp_threads_bind(cfg, cuda=True) is None
    assert vllm_engine.omp_threads_bind(vllm_engine.VllmConfig(model="m"), cuda=False) is None
