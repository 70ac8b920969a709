"""Media inputs decoded for an engine: WAV audio to float32 mono arrays, images to PIL images,
and the model's placeholders put into a prompt that has none.

Audio: WAV only (the stdlib ``wave`` module: 8, 16, 24 or 32-bit PCM, any channel count,
averaged to mono), at the model's sampling rate (16 kHz for Whisper-style encoders). A clip of
another rate is resampled when a resampler is installed (``soxr`` or ``scipy``), else refused
with the rate needed. Every refusal is an ``InvalidRequest`` naming the input
(``inputs[0]``, ``messages[1].media[0]``).
"""

from __future__ import annotations

import importlib.util
import io
import wave
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from omni_rpc.validation import InvalidRequest, modality

# The mime types of WAV files (browsers and tools disagree on the name).
WAV_MIME_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave")

Audio = npt.NDArray[np.float32]
Resampler = Callable[[Audio, int, int], Audio]


def _soxr(clip: Audio, rate: int, target: int) -> Audio:
    import soxr  # type: ignore[import-not-found,import-untyped,unused-ignore]

    return np.asarray(soxr.resample(clip, rate, target), dtype=np.float32)


def _scipy(clip: Audio, rate: int, target: int) -> Audio:
    from math import gcd

    from scipy.signal import resample_poly  # type: ignore[import-not-found,import-untyped,unused-ignore]

    g = gcd(rate, target)
    return np.asarray(resample_poly(clip, target // g, rate // g), dtype=np.float32)


def find_resampler() -> Resampler | None:
    """An installed resampler (soxr, then scipy), or None."""
    if importlib.util.find_spec("soxr") is not None:
        return _soxr
    if importlib.util.find_spec("scipy") is not None:
        return _scipy
    return None


def decode_wav(
    data: bytes, where: str, rate: int, resampler: Resampler | bool | None = True
) -> Audio:
    """A WAV file as float32 mono samples in [-1, 1] at ``rate`` Hz. ``resampler``: True for
    the installed one (``find_resampler``), None or False for none, or a function."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels = wav.getnchannels()
            width = wav.getsampwidth()
            clip_rate = wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError, ValueError) as exc:
        raise InvalidRequest(where, f"not a readable WAV file ({exc})") from None
    if channels < 1 or clip_rate <= 0:
        raise InvalidRequest(where, "not a readable WAV file (no channels or no frame rate)")
    usable = len(frames) - len(frames) % (width * channels)
    raw = np.frombuffer(frames[:usable], dtype=np.uint8)
    if width == 1:  # unsigned
        samples = (raw.astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = raw.view("<i2").astype(np.float32) / 32768.0
    elif width == 3:
        triples = raw.reshape(-1, 3).astype(np.int32)
        ints = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        samples = ints.astype(np.float32) / float(1 << 23)
    elif width == 4:
        samples = raw.view("<i4").astype(np.float32) / float(1 << 31)
    else:
        raise InvalidRequest(where, f"unsupported WAV sample width of {width} bytes")
    if samples.size == 0:
        raise InvalidRequest(where, "the WAV file holds no audio frames")
    mono: Audio = samples.reshape(-1, channels).mean(axis=1).astype(np.float32)
    if clip_rate == rate:
        return mono
    chosen = find_resampler() if resampler is True else resampler or None
    if chosen is None:
        raise InvalidRequest(
            where,
            f"the audio is at {clip_rate} Hz; this model needs {rate} Hz and no resampler "
            f"(soxr or scipy) is installed on the node: send {rate} Hz audio",
        )
    return chosen(mono, clip_rate, rate)


def decode_image(data: bytes, where: str) -> Any:
    """An image file as an RGB PIL image."""
    try:
        from PIL import Image

        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except ImportError:
        raise InvalidRequest(where, "images need Pillow on the node") from None
    except Exception as exc:  # PIL raises many kinds for a bad file
        raise InvalidRequest(where, f"not a readable image ({exc})") from None


def decode(mime_type: str, data: bytes, where: str, audio_rate: int) -> tuple[str, Any]:
    """A media input as (modality, what vLLM's ``multi_modal_data`` takes for it)."""
    kind = modality(mime_type)
    if kind == "audio":
        if mime_type.lower().split(";")[0].strip() not in WAV_MIME_TYPES:
            raise InvalidRequest(
                where, f"unsupported audio type {mime_type!r}: send WAV (audio/wav)"
            )
        return kind, (decode_wav(data, where, audio_rate), audio_rate)
    if kind == "image":
        return kind, decode_image(data, where)
    raise InvalidRequest(where, f"unsupported media type {mime_type!r} (WAV audio, images)")


def with_placeholders(
    ids: Sequence[int], placeholders: Sequence[Sequence[int]], markers: Sequence[int]
) -> list[int]:
    """A prompt's ids with the model's placeholders (one per media item, each the ids of the
    model's placeholder text and a newline, as vLLM's chat path joins them) put in front,
    unless the prompt already holds one of the placeholders' special tokens (``markers``):
    then the prompt places its media itself."""
    if not placeholders or any(t in markers for t in ids):
        return list(ids)
    return [*(t for p in placeholders for t in p), *ids]
