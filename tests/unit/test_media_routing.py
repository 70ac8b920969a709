"""Media inputs through the coordinator: validation, the media size limit, routing by modality
(fake nodes, virtual time), the HTTP front door's media parts and the SDK's."""

from __future__ import annotations

import base64
from typing import Any

import grpc
import pytest

from coordinator.admission import Admission, LimitExceeded, Limits
from coordinator.balancer import Balancer
from coordinator.dispatch import Dispatcher, DispatchError
from coordinator.http import openai_api
from coordinator.registry import HEALTHY, Node, Registry
from coordinator.session import split_batch
from coordinator.strategies import RoundRobin
from omni_rpc import Media
from omni_rpc.metrics import CoordinatorMetrics
from omni_rpc.sdk import build_chat_request, build_request
from omni_rpc.v1 import generate_pb2, node_agent_pb2
from omni_rpc.validation import InvalidRequest, input_modalities, media_bytes, validate_request
from tests.unit.clock import VirtualClock
from tests.unit.fakes import FakeFleet, FakeNode, join_request

PROMPT = "describe this"
WAV = b"RIFF....WAVEfmt "
PNG = b"\x89PNG\r\n\x1a\n"
PNG_URL = "data:image/png;base64,iVBORw0KGgo="


def media_request(*media: tuple[str, bytes], **fields: Any) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(prompt=PROMPT, **fields)
    request.sampling.max_tokens = 8
    for mime, data in media:
        request.inputs.add(mime_type=mime, data=data)
    return request


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media", "field", "words"),
    [
        (("text/plain", b"x"), "inputs[0].mime_type", "must be image/*, audio/* or video/*"),
        (("", b"x"), "inputs[0].mime_type", "must not be empty"),
        (("image", b"x"), "inputs[0].mime_type", "must be image/*"),
        (("audio/wav", b""), "inputs[0].data", "must not be empty"),
    ],
)
def test_bad_media_is_refused_naming_the_field(
    media: tuple[str, bytes], field: str, words: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_request(media_request(media))
    assert info.value.field == field and words in str(info.value)


def test_media_inputs_and_chat_parts_are_valid() -> None:
    validate_request(media_request(("image/png", PNG), ("AUDIO/wav", WAV), ("video/mp4", b"v")))
    chat = generate_pb2.GenerateRequest(modalities=["text", "audio", "audio"])
    turn = chat.messages.add(role="user")
    turn.parts.add(text="what is this?")
    turn.parts.add(media=generate_pb2.Media(mime_type="audio/wav", data=WAV))
    validate_request(chat)
    assert input_modalities(chat) == {"audio"} and media_bytes(chat) == len(WAV)
    turn.parts.add(media=generate_pb2.Media(mime_type="audio/wav"))
    with pytest.raises(InvalidRequest, match=r"messages\[0\]\.parts\[2\]\.media\.data"):
        validate_request(chat)


def test_output_modalities_are_text_audio_or_image() -> None:
    validate_request(media_request(modalities=["text", "image", "audio", "image"]))
    with pytest.raises(InvalidRequest) as info:
        validate_request(media_request(modalities=["video"]))
    assert info.value.field == "modalities" and "'video'" in str(info.value)


# -- the media limit ------------------------------------------------------------------------


def test_media_bytes_have_their_own_limit_not_the_prompts() -> None:
    admission = Admission(Limits(max_prompt_bytes=20, max_media_bytes=100), capacity=lambda: 1)
    admission.check_request(media_request(("image/png", b"x" * 100)))  # not prompt bytes
    with pytest.raises(LimitExceeded) as info:
        admission.check_request(media_request(("image/png", b"x" * 60), ("audio/wav", b"y" * 41)))
    assert str(info.value) == "media inputs are 101 bytes, over the limit max_media_bytes=100"


def test_the_media_limit_must_fit_the_message_limits() -> None:
    from coordinator.main import build_parser, media_limit_problem

    parser = build_parser()
    assert media_limit_problem(parser.parse_args([])) == ""
    small = parser.parse_args(["--max-message-bytes", "1000"])  # then the message limit rules
    assert media_limit_problem(small) == ""
    huge = parser.parse_args(["--max-message-bytes", str(2**30), "--max-media-bytes", str(2**29)])
    assert "does not fit an agent's message limit" in media_limit_problem(huge)


def test_session_batches_are_split_by_size() -> None:
    batch = node_agent_pb2.SessionRequest(cancels=[7])
    for stream_id in range(1, 5):
        start = batch.starts.add(stream_id=stream_id)
        start.request.generate.inputs.add(mime_type="image/png", data=b"x" * 400)
    messages = split_batch(batch, limit=1000)
    assert [[s.stream_id for s in m.starts] for m in messages] == [[1, 2], [3, 4]]
    assert list(messages[0].cancels) == [7]
    assert split_batch(batch) == [batch]  # small enough: one message, as before


# -- routing by modality --------------------------------------------------------------------


def join(
    registry: Registry,
    fleet: FakeFleet,
    node_id: str,
    model: str = "m",
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...] = (),
    healthy: bool = True,
) -> Node:
    fleet.add(FakeNode(node_id))
    info = join_request(node_id)
    info.model = model
    info.input_modalities.extend(inputs)
    info.output_modalities.extend(outputs)
    node, _ = registry.join(info)
    registry.report_probe(node, True, False, "health check: SERVING")
    assert node.state == HEALTHY
    if not healthy:
        registry.report_probe(node, False, False, "engine down")
    return node


def dispatcher(registry: Registry, no_node_wait_s: float = 30.0) -> Dispatcher:
    return Dispatcher(
        registry,
        Balancer(registry, RoundRobin()),
        2,
        no_node_wait_s=no_node_wait_s,
        metrics=CoordinatorMetrics(),
    )


async def served_by(dispatch: Dispatcher, request: generate_pb2.GenerateRequest) -> str:
    nodes = {r.node_id async for r in dispatch.generate(request, None)}
    assert len(nodes) == 1
    return nodes.pop()


async def test_media_goes_only_to_nodes_that_take_it(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    join(registry, fleet, "audio", inputs=("audio",))
    join(registry, fleet, "image", inputs=("image",), outputs=("image",))
    join(registry, fleet, "both", inputs=("audio", "image"), outputs=("audio",))
    dispatch = dispatcher(registry)
    audio = [await served_by(dispatch, media_request(("audio/wav", WAV))) for _ in range(6)]
    assert set(audio) == {"audio", "both"}
    images = {await served_by(dispatch, media_request(("image/png", PNG))) for _ in range(6)}
    assert images == {"image", "both"}
    mixed = media_request(("image/png", PNG), ("audio/wav", WAV))
    assert {await served_by(dispatch, mixed) for _ in range(3)} == {"both"}
    speak = media_request(("image/png", PNG), modalities=["text", "audio"])
    assert {await served_by(dispatch, speak) for _ in range(3)} == {"both"}
    text = {await served_by(dispatch, media_request()) for _ in range(6)}
    assert text == {"audio", "image", "both"}
    assert registry.dispatchable("m", frozenset({"video"})) == ()


async def test_media_no_node_of_the_model_takes_is_refused(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    join(registry, fleet, "n1", inputs=("image",))
    join(registry, fleet, "other", model="talker", inputs=("audio",), outputs=("audio",))
    dispatch = dispatcher(registry)
    with pytest.raises(DispatchError) as info:
        await served_by(dispatch, media_request(("audio/wav", WAV), model="m"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == (
        "inputs: model 'm' does not take audio input (it takes: text, image)"
    )
    with pytest.raises(DispatchError) as out:
        await served_by(dispatch, media_request(model="m", modalities=["audio"]))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert out.value.message == (
        "modalities: model 'm' does not produce audio output (it produces: text)"
    )
    # The other model takes it; nothing was sent to any node.
    assert await served_by(dispatch, media_request(("audio/wav", WAV), model="talker")) == "other"
    assert fleet.nodes["n1"].attempts == []


async def test_a_single_model_cluster_names_its_model(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    join(registry, fleet, "n1", model="only")
    with pytest.raises(DispatchError) as info:
        await served_by(dispatcher(registry), media_request(("video/mp4", b"v")))
    assert info.value.message == "inputs: model 'only' does not take video input (it takes: text)"


async def test_capable_but_unhealthy_nodes_mean_waiting_not_refusal(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    join(registry, fleet, "text", inputs=())
    join(registry, fleet, "audio", inputs=("audio",), healthy=False)
    dispatch = dispatcher(registry, no_node_wait_s=5.0)
    started = clock.now
    with pytest.raises(DispatchError) as info:
        await served_by(dispatch, media_request(("audio/wav", WAV)))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert clock.now - started == pytest.approx(5.0, abs=0.1)
    assert fleet.nodes["text"].attempts == []


def test_nodes_show_their_modalities(registry: Registry, fleet: FakeFleet) -> None:
    from omni_rpc.cli.main import format_models
    from omni_rpc.sdk.client import node_dict

    node = join(registry, fleet, "n1", inputs=("image", "audio"), outputs=("audio",))
    info = node.to_proto()
    assert list(info.input_modalities) == ["image", "audio"]
    assert list(info.output_modalities) == ["audio"]
    shown = node_dict(info)
    assert shown["input_modalities"] == ["image", "audio"]
    assert format_models({"health_stats": {"n1": shown}}) == (
        "models: m [in: text, audio, image; out: text, audio] 1/1 healthy"
    )


def test_the_agent_advertises_the_sim_flags() -> None:
    from node_agent.main import build_engine, build_parser

    parser = build_parser()
    default = build_engine(parser.parse_args([]))
    assert default.input_modalities == ("image", "audio", "video")
    assert default.output_modalities == ("audio", "image")
    images = build_engine(
        parser.parse_args(["--sim-input-modalities", "image", "--sim-output-modalities", ""])
    )
    assert (images.input_modalities, images.output_modalities) == (("image",), ())
    with pytest.raises(SystemExit):
        parser.parse_args(["--sim-input-modalities", "smell"])


# -- the HTTP front door --------------------------------------------------------------------


def chat_body(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}


def test_openai_media_parts_become_media() -> None:
    b64 = base64.b64encode(WAV).decode()
    call = openai_api.chat_call(
        chat_body(
            {"type": "text", "text": "hi"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
            {"type": "input_audio", "input_audio": {"data": b64, "format": "mp3"}},
        )
    )
    parts = call.request.messages[0].parts
    assert parts[0].text == "hi"
    assert (parts[1].media.mime_type, parts[1].media.data) == ("image/png", PNG[:8])
    assert (parts[2].media.mime_type, parts[2].media.data) == ("audio/wav", WAV)
    assert parts[3].media.mime_type == "audio/mp3"


@pytest.mark.parametrize(
    ("part", "param", "words"),
    [
        (
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            "messages[0].content[0].image_url.url",
            "only data: URLs",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
            "messages[0].content[0].image_url.url",
            "not valid base64",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:audio/wav;base64,AAAA"}},
            "messages[0].content[0].image_url.url",
            "image/*",
        ),
        (
            {"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}},
            "messages[0].content[0].input_audio.data",
            "not valid base64",
        ),
        (
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "WAV/x"}},
            "messages[0].content[0].input_audio.format",
            "audio format",
        ),
    ],
)
def test_openai_media_parts_are_checked(part: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(openai_api.ApiError) as info:
        openai_api.chat_call(chat_body(part))
    assert (info.value.status, info.value.param) == (400, param)
    assert words in str(info.value.payload())


# -- the SDK --------------------------------------------------------------------------------


def test_sdk_inputs_and_media_parts() -> None:
    request = build_request(
        "hi", None, {"inputs": [("image/png", PNG), Media("audio/wav", WAV)], "max_tokens": 3}
    )
    assert [(m.mime_type, m.data) for m in request.inputs] == [
        ("image/png", PNG),
        ("audio/wav", WAV),
    ]
    b64 = base64.b64encode(WAV).decode()
    chat = build_chat_request(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                    {"type": "audio", "data": WAV, "mime_type": "audio/wav"},
                ],
            }
        ],
        None,
        {},
    )
    media = [(p.media.mime_type, p.media.data) for p in chat.messages[0].parts[1:]]
    assert media == [("audio/wav", WAV), ("image/png", PNG[:8]), ("audio/wav", WAV)]
    with pytest.raises(ValueError, match=r"inputs\[0\]\.mime_type: must be image/\*"):
        build_request("hi", None, {"inputs": [("text/plain", b"x")]})
    with pytest.raises(ValueError, match="a audio part's mime_type must be audio/"):
        build_chat_request(
            [
                {
                    "role": "user",
                    "content": [{"type": "audio", "data": WAV, "mime_type": "image/png"}],
                }
            ],
            None,
            {},
        )
    with pytest.raises(ValueError, match="nothing is fetched"):
        build_chat_request(
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ],
            None,
            {},
        )
    with pytest.raises(TypeError, match="inputs must be a list"):
        build_request("hi", None, {"inputs": Media("audio/wav", WAV)})
