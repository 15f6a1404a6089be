"""The adapters' audio containers: each format decodes (with FFmpeg) to what went in, streams from the first audio
on, and WAV's header is open-ended for streaming."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from realtime.adapters.containers import FORMATS, ContainerEncoder, decode_audio
from tests.realtime.adapters.conftest import duration_s

RATE = 24000


def tone(seconds: float, rate: int = RATE, amplitude: float = 0.25) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 220 * t) * amplitude * 32767).astype("<i2")


def encode_in_frames(fmt: str, pcm: np.ndarray, rate: int = RATE, **kw: float) -> list[bytes]:
    enc = ContainerEncoder(fmt, rate, **kw)  # type: ignore[arg-type]
    step = rate // 50
    return [enc.push(pcm[i : i + step].tobytes()) for i in range(0, len(pcm), step)] + [enc.close()]


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "ulaw"])
def test_each_format_decodes_to_the_duration_pushed(fmt: str) -> None:
    pieces = encode_in_frames(fmt, tone(1.5))
    got = duration_s(b"".join(pieces), fmt, RATE)
    slack = 0.1 if fmt in ("mp3", "aac") else 0.001  # MP3 and AAC pad with their encoder delay
    assert 1.5 - 0.001 <= got <= 1.5 + slack, (fmt, got)


@pytest.mark.parametrize("fmt,within", [("pcm", 0), ("wav", 0), ("opus", 0), ("mp3", 3), ("aac", 4)])
def test_streams_start_with_the_first_audio(fmt: str, within: int) -> None:
    """Bytes come out within the codec's own first frame (MP3: 1152 samples, AAC: 1024 + priming), not at the end."""
    pieces = encode_in_frames(fmt, tone(1.0))
    first = next(i for i, p in enumerate(pieces) if p)
    assert first <= within, (fmt, first)
    assert sum(1 for p in pieces[:-1] if p) > len(pieces) // 3, "bytes flow all along, not in one piece"


def test_wav_header_is_open_ended_and_exact() -> None:
    pieces = encode_in_frames("wav", tone(0.1))
    data = b"".join(pieces)
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    assert struct.unpack_from("<I", data, 4)[0] == 0xFFFFFFFF and struct.unpack_from("<I", data, 40)[0] == 0xFFFFFFFF
    channels, rate, _, _, bits = struct.unpack_from("<HIIHH", data, 22)
    assert (channels, rate, bits) == (1, RATE, 16)
    assert data[44:] == tone(0.1).tobytes()
    assert ContainerEncoder("wav", RATE).close()[:4] == b"RIFF"  # an empty WAV is still a WAV


def test_ulaw_and_gain() -> None:
    pcm = tone(0.2, 8000)
    ulaw = b"".join(encode_in_frames("ulaw", pcm, 8000))
    assert len(ulaw) == len(pcm)
    louder = np.frombuffer(b"".join(encode_in_frames("pcm", pcm, 8000, gain_db=6.0)), "<i2")
    assert np.max(np.abs(louder)) == pytest.approx(2 * np.max(np.abs(pcm)), rel=0.01)


def test_bad_settings_are_refused() -> None:
    for fmt, rate in (("opus", 44100), ("ulaw", 16000), ("ogg", 24000), ("mp3", 96000)):
        with pytest.raises(ValueError):
            ContainerEncoder(fmt, rate)


def test_decode_audio_reads_mp3_and_refuses_noise() -> None:
    mp3 = b"".join(encode_in_frames("mp3", tone(1.2)))
    pcm, rate = decode_audio(mp3)
    assert rate == RATE and 1.2 <= pcm.size / rate <= 1.3 and pcm.dtype == np.float32
    with pytest.raises(ValueError):
        decode_audio(b"\x00\x01 not audio at all" * 10)
