"""Media inputs decoded for vLLM: WAV to float32 mono, refusals naming the input, the model's
placeholders put in front of a prompt without any, and tiny-qwen2-audio's weight renaming."""

from __future__ import annotations

import io
import math
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from node_agent import media
from node_agent.engine import ChatTurn, MediaInput
from node_agent.engines.vllm import _chat_message
from node_agent.models import KNOWN, rename_weight, rename_weights
from omni_rpc.validation import InvalidRequest


def wav(frames: bytes, rate: int = 16000, channels: int = 1, width: int = 2) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames)
    return out.getvalue()


def pcm16(samples: list[float]) -> bytes:
    return b"".join(struct.pack("<h", int(32767 * s)) for s in samples)


def test_a_16_bit_wav_decodes_to_float32_mono() -> None:
    samples = [0.5 * math.sin(2 * math.pi * 440 * i / 16000) for i in range(16000)]
    clip = media.decode_wav(wav(pcm16(samples)), "inputs[0]", 16000)
    assert clip.dtype == np.float32 and clip.shape == (16000,)
    assert np.allclose(clip, samples, atol=1e-4)


def test_stereo_is_averaged_and_8_bit_is_unsigned() -> None:
    stereo = pcm16([0.5, -0.5, 0.25, 0.25])  # frames (0.5, -0.5) and (0.25, 0.25)
    clip = media.decode_wav(wav(stereo, channels=2), "inputs[0]", 16000)
    assert np.allclose(clip, [0.0, 0.25], atol=1e-4)
    clip = media.decode_wav(wav(bytes([128, 255, 0]), width=1), "inputs[0]", 16000)
    assert np.allclose(clip, [0.0, 127 / 128, -1.0])


def test_24_bit_samples_keep_their_sign() -> None:
    frames = (-(1 << 22)).to_bytes(3, "little", signed=True) + (1 << 22).to_bytes(
        3, "little", signed=True
    )
    clip = media.decode_wav(wav(frames, width=3), "inputs[0]", 16000)
    assert np.allclose(clip, [-0.5, 0.5])


@pytest.mark.parametrize("data", [b"", b"not a wav at all", b"RIFF\x00\x00\x00\x00WAVE"])
def test_a_corrupt_wav_names_the_input(data: bytes) -> None:
    with pytest.raises(InvalidRequest, match="not a readable WAV") as info:
        media.decode_wav(data, "messages[1].media[0]", 16000)
    assert info.value.field == "messages[1].media[0]"


def test_an_empty_wav_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="no audio frames"):
        media.decode_wav(wav(b""), "inputs[0]", 16000)


def test_another_rate_without_a_resampler_says_which_rate_is_needed() -> None:
    with pytest.raises(InvalidRequest, match="8000 Hz; this model needs 16000 Hz and no") as info:
        media.decode_wav(wav(pcm16([0.1] * 80), rate=8000), "inputs[2]", 16000, resampler=None)
    assert info.value.field == "inputs[2]"


def test_another_rate_goes_through_an_installed_resampler() -> None:
    calls: list[tuple[int, int]] = []

    def double(clip: media.Audio, rate: int, target: int) -> media.Audio:
        calls.append((rate, target))
        return np.repeat(clip, target // rate)

    clip = media.decode_wav(wav(pcm16([0.1] * 80), rate=8000), "inputs[0]", 16000, double)
    assert calls == [(8000, 16000)] and clip.shape == (160,)


def test_unsupported_audio_and_media_types_are_refused_naming_the_input() -> None:
    with pytest.raises(InvalidRequest, match="'audio/mpeg': send WAV") as info:
        media.decode("audio/mpeg", b"ID3", "inputs[1]", 16000)
    assert info.value.field == "inputs[1]"
    with pytest.raises(InvalidRequest, match="video/mp4"):
        media.decode("video/mp4", b"....", "inputs[0]", 16000)
    with pytest.raises(InvalidRequest, match="not a readable image"):
        media.decode("image/png", b"\x89PNG broken", "inputs[0]", 16000)


def test_audio_decodes_with_its_rate_and_wav_aliases() -> None:
    kind, (clip, rate) = media.decode("audio/x-wav", wav(pcm16([0.0] * 10)), "inputs[0]", 16000)
    assert kind == "audio" and rate == 16000 and clip.shape == (10,)


def test_an_image_decodes_to_rgb() -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (4, 3), 200).save(buffer, format="PNG")
    kind, image = media.decode("image/png", buffer.getvalue(), "inputs[0]", 16000)
    assert kind == "image" and image.mode == "RGB" and image.size == (4, 3)


def test_placeholders_go_in_front_of_a_prompt_without_any() -> None:
    one, two = [9, 1, 2, 3, 10], [9, 4, 2, 3, 10]
    assert media.with_placeholders([5, 6], [one, two], markers=[2]) == [*one, *two, 5, 6]
    # The prompt holds the placeholder's special token: it places its media itself.
    assert media.with_placeholders([5, 2, 6], [one], markers=[2]) == [5, 2, 6]
    assert media.with_placeholders([5, 6], [], markers=[2]) == [5, 6]


def test_a_turn_with_media_becomes_parts_media_first() -> None:
    audio = MediaInput(mime_type="audio/wav", data=b"...")
    assert _chat_message(ChatTurn("user", "hi")) == {"role": "user", "content": "hi"}
    assert _chat_message(ChatTurn("user", "What is it?", (audio,))) == {
        "role": "user",
        "content": [{"type": "audio"}, {"type": "text", "text": "What is it?"}],
    }


def test_the_doubled_text_prefix_is_renamed_for_vllm(tmp_path: Path) -> None:
    assert (
        rename_weight("language_model.model.model.layers.0.mlp.up_proj.weight")
        == "language_model.model.layers.0.mlp.up_proj.weight"
    )
    for kept in ("language_model.lm_head.weight", "audio_tower.conv1.weight"):
        assert rename_weight(kept) == kept
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model.safetensors"
    save_file(
        {
            "language_model.model.model.embed_tokens.weight": torch.zeros(2, 2),
            "language_model.lm_head.weight": torch.ones(2, 2),
        },
        str(path),
    )
    assert rename_weights(path) == 1
    assert sorted(load_file(str(path))) == [
        "language_model.lm_head.weight",
        "language_model.model.embed_tokens.weight",
    ]
    assert rename_weights(path) == 0


def test_tiny_qwen2_audio_is_a_known_model() -> None:
    assert "tiny-qwen2-audio" in KNOWN
