"""Audio containers for the adapters: a session's PCM16 in, the bytes of a vendor's format out, as they are made.

``ContainerEncoder`` takes PCM16 mono at one rate (what a protocol v1 session sends with ``codec: pcm16``) and
returns the bytes of one stream of a container format, incrementally: each ``push`` gives whatever the encoder
and muxer have completed, so Ogg/Opus and MP3 start with the first audio (after the codec's own frame: 1152
samples for MP3, 20 ms for Opus). Everything but the WAV header is FFmpeg's, through PyAV (libmp3lame, libopus,
the native AAC and FLAC encoders, and the ogg / mp3 / adts / flac muxers); the output has no seek back, so FLAC's
STREAMINFO carries no total length and WAV's sizes are open-ended (0xFFFFFFFF, as streaming servers write them).

| format | codec | container |
|---|---|---|
| pcm | PCM16 little-endian, raw | none |
| wav | PCM16 | RIFF/WAVE, open-ended sizes |
| ulaw | G.711 mu-law, raw (8 kHz) | none |
| mp3 | libmp3lame, CBR | MP3 frames |
| opus | libopus, 20 ms packets | Ogg, a page per packet |
| aac | AAC-LC | ADTS |
| flac | FLAC | native FLAC stream |

Encoders are not thread-safe but keep no thread affinity: callers run ``push`` / ``close`` one at a time, on
any thread (the adapters use the gateway's codec pool, off the event loop).
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np

from realtime.audio import mulaw_encode

__all__ = ["FORMATS", "MEDIA_TYPES", "ContainerEncoder", "decode_audio"]

FORMATS = ("pcm", "wav", "ulaw", "mp3", "opus", "aac", "flac")
MEDIA_TYPES = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "ulaw": "audio/basic",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
}
# format -> (PyAV codec, muxer, muxer options)
_FFMPEG: dict[str, tuple[str, str, dict[str, str]]] = {
    "mp3": ("libmp3lame", "mp3", {}),
    "opus": ("libopus", "ogg", {"page_duration": "20000"}),  # µs: a page per 20 ms packet, not one per second
    "aac": ("aac", "adts", {}),
    "flac": ("flac", "flac", {}),
}
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_DEFAULT_BITRATE = {"mp3": 128_000, "opus": 32_000, "aac": 64_000}


class _Sink:
    """A write-only, unseekable file for PyAV's muxer: it collects what was written since the last ``take``."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: Any) -> int:
        self._buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


def wav_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A RIFF/WAVE header for PCM whose length is not known yet: both sizes 0xFFFFFFFF."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * block, block, bits)
    return b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + \
        b"data" + struct.pack("<I", 0xFFFFFFFF)


class ContainerEncoder:
    """One stream of ``fmt`` from PCM16 mono at ``sample_rate``; ``gain_db`` scales the samples first."""

    def __init__(self, fmt: str, sample_rate: int, bitrate: int | None = None, gain_db: float = 0.0) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if fmt == "ulaw" and sample_rate != 8000:
            raise ValueError("ulaw is 8000 Hz")
        if fmt == "opus" and sample_rate not in OPUS_RATES:
            raise ValueError(f"opus sample rates: {', '.join(map(str, OPUS_RATES))}; got {sample_rate}")
        if fmt in ("mp3", "aac") and sample_rate not in MP3_RATES:
            raise ValueError(f"{fmt} sample rates: {', '.join(map(str, MP3_RATES))}; got {sample_rate}")
        self.format = fmt
        self.sample_rate = sample_rate
        self.bitrate = bitrate or _DEFAULT_BITRATE.get(fmt)
        self._gain = float(10.0 ** (gain_db / 20.0)) if gain_db else None
        self._head = wav_header(sample_rate) if fmt == "wav" else b""
        self._container: Any = None
        self._stream: Any = None
        self._sink = _Sink()
        self._pts = 0
        self.closed = False

    @property
    def cheap(self) -> bool:
        """No codec: fast enough to run on the event loop."""
        return self.format in ("pcm", "wav", "ulaw") and self._gain is None

    def push(self, pcm16: bytes) -> bytes:
        """PCM16 little-endian mono in; the container bytes completed so far out (maybe none yet)."""
        if self.closed:
            raise ValueError("the encoder is closed")
        samples = np.frombuffer(pcm16, dtype="<i2")
        if self._gain is not None and samples.size:
            samples = np.clip(np.rint(samples * self._gain), -32768, 32767).astype("<i2")
        head, self._head = self._head, b""
        if self.format in ("pcm", "wav"):
            return head + samples.tobytes()
        if self.format == "ulaw":
            return mulaw_encode(samples.astype(np.float32) / 32768.0)
        if self._container is None:
            self._open()
        if samples.size:
            import av

            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self._pts
            self._pts += samples.size
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.take()

    def close(self) -> bytes:
        """Drain the encoder and end the stream; the last bytes out."""
        if self.closed:
            return b""
        self.closed = True
        if self.format in ("pcm", "wav", "ulaw"):
            head, self._head = self._head, b""
            return head  # an empty WAV is still a WAV
        if self._container is None:
            self._open()
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()

    def _open(self) -> None:
        import av  # imported on first use: serving protocol v1 alone never loads FFmpeg

        codec, muxer, options = _FFMPEG[self.format]
        self._container = av.open(self._sink, "w", format=muxer, options=options)
        stream = self._container.add_stream(codec, rate=self.sample_rate, layout="mono")
        if self.bitrate is not None:
            stream.bit_rate = self.bitrate
        self._stream = stream


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Any audio file FFmpeg reads (MP3, WAV, Ogg, FLAC, M4A, ...) to (float32 mono, sample rate).
    Raises ValueError when it is not audio."""
    import av

    chunks: list[np.ndarray] = []
    rate = 0
    try:
        with av.open(io.BytesIO(data), "r") as container:
            if not container.streams.audio:
                raise ValueError("no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono")
            for frame in container.decode(stream):
                rate = frame.sample_rate
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as exc:
        raise ValueError(f"not a readable audio file ({exc})") from None
    if not chunks or not rate:
        raise ValueError("the audio holds no samples")
    return np.concatenate(chunks).astype(np.float32), rate
