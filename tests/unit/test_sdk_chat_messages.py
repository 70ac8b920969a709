"""The SDK's chat messages, checked on the client before any traffic, and the engine that
follows the model."""

from __future__ import annotations

from typing import Any

import pytest

from omni_rpc import config
from omni_rpc.launchers import check_model, resolve_engine
from omni_rpc.launchers.local import LaunchError
from omni_rpc.sdk import build_chat_request, build_request
from omni_rpc.sdk.chat import chat_messages
from omni_rpc.v1 import generate_pb2


def test_messages_become_chat_messages_with_text_or_parts() -> None:
    messages = chat_messages(
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}],
            },
            {"role": "assistant", "content": ""},
        ]
    )
    assert messages[0] == generate_pb2.ChatMessage(role="system", content="Be brief.")
    assert [p.text for p in messages[1].parts] == ["Hi", "!"] and not messages[1].content
    assert messages[2] == generate_pb2.ChatMessage(role="assistant", content="")


def test_chat_request_shares_the_prompt_request_building() -> None:
    sampling: dict[str, Any] = {"model": "m", "max_tokens": 5, "temperature": 0.0, "stop": "x"}
    chat = build_chat_request([{"role": "user", "content": "Hi"}], 3, sampling)
    prompt = build_request("Hi", 3, sampling)
    assert chat.model == prompt.model == "m"
    assert chat.sampling == prompt.sampling and chat.max_retries == prompt.max_retries == 3
    assert list(chat.messages) == [generate_pb2.ChatMessage(role="user", content="Hi")]
    assert not chat.prompt and prompt.prompt == "Hi" and not prompt.messages
    with pytest.raises(TypeError, match=r"unknown sampling argument.*bogus"):
        build_chat_request([{"role": "user", "content": "Hi"}], None, {"bogus": 1})


@pytest.mark.parametrize(
    ("messages", "error", "match"),
    [
        ("Hi", TypeError, "messages must be a list of dicts"),
        ({"role": "user", "content": "Hi"}, TypeError, "messages must be a list of dicts"),
        ([], ValueError, "must not be empty"),
        (["Hi"], TypeError, r"messages\[0\] must be a dict"),
        ([{"content": "Hi"}], TypeError, r"messages\[0\]\.role must be a string"),
        ([{"role": "", "content": "Hi"}], ValueError, r"messages\[0\]\.role must not be empty"),
        ([{"role": "r" * 65, "content": "Hi"}], ValueError, "at most 64 characters"),
        ([{"role": "user"}], ValueError, r"messages\[0\] has no content"),
        ([{"role": "user", "content": None}], TypeError, "string or a list of parts"),
        ([{"role": "user", "content": 7}], TypeError, "string or a list of parts"),
        ([{"role": "user", "content": []}], ValueError, "must not be empty"),
        ([{"role": "user", "content": "Hi", "name": "x"}], ValueError, "unknown key.*name"),
        ([{"role": "user", "content": ["Hi"]}], TypeError, r"content\[0\] must be a dict"),
        (
            [{"role": "user", "content": [{"type": "text", "text": 3}]}],
            TypeError,
            r"content\[0\]\.text must be a string",
        ),
        (
            [{"role": "user", "content": [{"type": "video_url"}]}],
            ValueError,
            "unknown part type 'video_url'",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            ValueError,
            "only base64 data: URLs are supported",
        ),
        (
            [
                {"role": "user", "content": "ok"},
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            ],
            ValueError,
            r"messages\[1\]\.content\[0\]\.input_audio\.format: an audio format",
        ),
        (
            [{"role": "user", "content": "x"}] * (config.MAX_CHAT_MESSAGES + 1),
            ValueError,
            f"at most {config.MAX_CHAT_MESSAGES} messages",
        ),
    ],
)
def test_malformed_messages_fail_clearly(messages: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        chat_messages(messages)
    with pytest.raises(error, match=match):  # build_chat_request checks them the same way
        build_chat_request(messages, None, {})


def test_the_engine_follows_the_model() -> None:
    assert resolve_engine(None, None) == ("sim", "sim")
    assert resolve_engine(None, "sim") == ("sim", "sim")
    assert resolve_engine(None, "Qwen/Qwen2.5-Omni-7B") == ("vllm", "Qwen/Qwen2.5-Omni-7B")
    assert resolve_engine(None, "/models/mine") == ("vllm", "/models/mine")
    assert resolve_engine("vllm", None) == ("vllm", config.DEFAULT_MODELS["vllm"])
    # Simulated output under another name only when asked for by name.
    assert resolve_engine("sim", "Qwen/Qwen2.5-Omni-7B") == ("sim", "Qwen/Qwen2.5-Omni-7B")
    assert resolve_engine("sim", None) == ("sim", "sim")
    with pytest.raises(ValueError, match="unknown engine 'tgi'"):
        resolve_engine("tgi", "m")


def test_a_missing_model_folder_fails_before_anything_starts() -> None:
    check_model("sim", "/no/such/folder")  # a simulated model is only a name
    with pytest.raises(LaunchError, match="'/no/such/folder' is neither a model folder"):
        check_model("vllm", "/no/such/folder")
