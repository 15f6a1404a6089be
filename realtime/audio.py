"""Audio for the wire: output formats, streaming encoders (Opus, PCM16, G.711 mu-law and A-law) and reference-audio
readers.

``AudioEncoder`` turns engine PCM (float32 mono at the engine's rate) into wire packets: it resamples in streaming
fashion (libsoxr, state carried across calls), cuts fixed frames and encodes each one. All per-sample work is
vectorised numpy or C; Python only loops per frame.

Choices:
- Opus runs with application AUDIO and signal VOICE: the input is clean synthesised speech, not a microphone, so
  we want the fidelity-oriented mode (no VoIP high-pass / speech enhancement), while the VOICE hint still biases
  the mode decision toward SILK/hybrid at low bitrates. No FEC and no DTX: the transport (WebSocket/TCP) does not
  lose packets and pacing wants a packet per frame.
- pcm16, mulaw and alaw frames: ``frame_ms`` is a multiple of 10 within [10, 100], and a frame must hold a whole number
  of samples (``sample_rate * frame_ms`` divisible by 1000; e.g. 22050 Hz needs a multiple of 20 ms).
- The Opus encoder's lookahead (``AudioEncoder.codec_delay``, 6.5 ms at 48 kHz) is not padded by ``flush``: the
  packet count is exactly ``ceil(samples / frame)``, and what a decoder drops at the end is that lookahead.
"""

from __future__ import annotations

import ctypes
import io
import math
import os
import struct
import wave
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import BinaryIO

import numpy as np
import opuslib_next
import soxr

__all__ = [
    "AudioEncoder",
    "OutputFormat",
    "decode_opus",
    "float_to_pcm16",
    "alaw_decode",
    "alaw_encode",
    "mulaw_decode",
    "mulaw_encode",
    "pcm16_to_float",
    "read_audio_bytes",
    "write_ogg_opus",
    "write_wav",
]

CODECS = ("opus", "pcm16", "mulaw", "alaw")
G711 = ("mulaw", "alaw")  # 8 kHz telephony codecs
TIMESTAMPS = ("none", "words", "visemes")  # output.timestamps: visemes includes words
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
OPUS_FRAME_MS = (10, 20, 40, 60)
_OPUS_MAX_PACKET = 4000  # libopus' recommended max_data_bytes
_OPUS_MAX_FRAME_48K = 5760  # 120 ms at 48 kHz: the largest frame a decoder may be handed
# The server's Opus complexity (0..10; libopus' default is 9). Not a client setting: it trades the server's CPU per
# stream, which a client cannot judge and should not raise, so it stays out of protocol v1's ``output``. Chosen by
# measurement (``python -m loadtest.codec_bench``, espeak speech at 32 kb/s, this 2-core EPYC): 4 is the knee. It
# encodes a 20 ms frame in 117 us instead of 219 us (0.59 % of a core per stream instead of 1.10 %) and sounds like
# the default at 28-29 kb/s (SNR 15.3 vs 15.8 dB, log-spectral distance 5.6 vs 5.4 dB); 5 gives the same packets,
# every step above costs 30-90 % more for at most 0.2 dB, and 0-1 (0.28-0.32 %) sound like the default at 20 kb/s.
OPUS_COMPLEXITY = 4
# opus_encode_float called directly: the frame read in place from the numpy buffer, the packet written into one
# buffer per encoder (opuslib's wrapper copies the frame to bytes and allocates a 4000-byte buffer per packet)
_opus_encode_float = opuslib_next.api.libopus["opus_encode_float"]  # a private function object: argtypes are ours
_opus_encode_float.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_opus_encode_float.restype = ctypes.c_int


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"output.{name} must be an integer, got {type(value).__name__}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"output.{name} must be within [{lo}, {hi}], got {value}")
    return int(value)


@dataclass(frozen=True)
class OutputFormat:
    """The ``output`` settings of protocol v1 (plus the Opus bitrate)."""

    codec: str = "opus"
    sample_rate: int = 48000
    frame_ms: int = 20
    lead_ms: int = 1500
    bitrate: int = 32000  # Opus only; validated for every codec
    mix: bool = False  # concurrent contexts mixed into one stream by the server (realtime/mix.py)
    timestamps: str = "none"  # word timing messages: none | words | visemes (words and visemes)

    def __post_init__(self) -> None:
        if not isinstance(self.mix, bool):
            raise ValueError(f"output.mix must be true or false, got {self.mix!r}")
        if not isinstance(self.timestamps, str) or self.timestamps not in TIMESTAMPS:
            raise ValueError(f"output.timestamps must be one of {', '.join(TIMESTAMPS)}, got {self.timestamps!r}")
        if self.mix and self.timestamps != "none":
            raise ValueError("output.timestamps needs unmixed output: with output.mix, audio.ms is the mix's clock, "
                             "not a turn's, so word times could not be placed on it")
        if not isinstance(self.codec, str) or self.codec not in CODECS:
            raise ValueError(f"output.codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        rate = _check_int("sample_rate", self.sample_rate, 8000, 48000)
        frame = _check_int("frame_ms", self.frame_ms, 10, 100)
        for name, value in (("sample_rate", rate), ("frame_ms", frame)):
            object.__setattr__(self, name, value)  # normalise numpy ints
        object.__setattr__(self, "lead_ms", _check_int("lead_ms", self.lead_ms, 0, 10_000))
        object.__setattr__(self, "bitrate", _check_int("bitrate", self.bitrate, 6000, 256_000))
        if self.codec == "opus":
            if rate not in OPUS_RATES:
                raise ValueError(f"output.sample_rate for opus must be one of {OPUS_RATES}, got {rate}")
            if frame not in OPUS_FRAME_MS:
                raise ValueError(f"output.frame_ms for opus must be one of {OPUS_FRAME_MS}, got {frame}")
            return
        if self.codec in G711 and rate != 8000:
            raise ValueError(f"output.sample_rate for {self.codec} must be 8000 (G.711), got {rate}")
        if frame % 10:
            raise ValueError(f"output.frame_ms for {self.codec} must be a multiple of 10, got {frame}")
        if rate * frame % 1000:
            raise ValueError(
                f"output.frame_ms={frame} at {rate} Hz is not a whole number of samples; use a multiple of "
                f"{1000 // math.gcd(rate, 1000)} ms"
            )

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate * self.frame_ms // 1000

    @classmethod
    def from_wire(cls, d: Mapping[str, object] | None, base: OutputFormat | None = None) -> OutputFormat:
        """Settings from a wire map: unknown keys ignored, missing (or null) keys taken from ``base``.

        A missing ``sample_rate`` follows the codec where it has to: 8000 for mulaw and alaw, and back to 48000 when
        switching away from them."""
        base = base if base is not None else cls()
        if d is None:
            return base
        if not isinstance(d, Mapping):
            raise ValueError(f"output must be a map, got {type(d).__name__}")

        def get(key: str, default: object) -> object:
            value = d.get(key)
            return default if value is None else value

        codec = get("codec", base.codec)
        if d.get("sample_rate") is not None:
            rate = d["sample_rate"]
        elif codec in G711:
            rate = 8000
        elif base.codec in G711:
            rate = cls.sample_rate
        else:
            rate = base.sample_rate
        return cls(
            codec=codec,  # type: ignore[arg-type]
            sample_rate=rate,  # type: ignore[arg-type]
            frame_ms=get("frame_ms", base.frame_ms),  # type: ignore[arg-type]
            lead_ms=get("lead_ms", base.lead_ms),  # type: ignore[arg-type]
            bitrate=get("bitrate", base.bitrate),  # type: ignore[arg-type]
            mix=get("mix", base.mix),  # type: ignore[arg-type]
            timestamps=get("timestamps", base.timestamps),  # type: ignore[arg-type]
        )

    def to_wire(self) -> dict[str, object]:
        wire = asdict(self)
        if not self.mix:
            del wire["mix"]  # only when asked for: the wire stays as it was for every other client
        if self.timestamps == "none":
            del wire["timestamps"]
        return wire


# ---------------------------------------------------------------------------------------------------- sample codecs


def _finite(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 with NaN as 0 and infinities as full scale: one pass to check, so nan_to_num's six passes are
    paid only when something is not finite, which is rare."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN: quietly, it only means "clean it"
        total = x.sum(dtype=np.float64)
    return x if np.isfinite(total) else np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)


def float_to_pcm16(x: np.ndarray) -> bytes:
    """Float samples in [-1, 1] (clipped; NaN -> 0) to PCM16 little-endian bytes."""
    y = _finite(x) * 32768.0
    return np.clip(np.rint(y), -32768, 32767).astype("<i2").tobytes()


def pcm16_to_float(b: bytes) -> np.ndarray:
    if len(b) % 2:
        raise ValueError(f"PCM16 data must have an even number of bytes, got {len(b)}")
    return np.frombuffer(b, dtype="<i2").astype(np.float32) / np.float32(32768.0)


_MULAW_BIAS = 0x84
_MULAW_CLIP = 32635
# exponent for (biased magnitude >> 7) in 0..255: the position of its highest set bit
_MULAW_EXP = np.array([0] + [int(math.log2(v)) for v in range(1, 256)], dtype=np.int32)


def _mulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
    mag = (((mantissa << 3) + _MULAW_BIAS) << exponent) - _MULAW_BIAS
    return np.where(u & 0x80, -mag, mag).astype(np.int16)


_MULAW_DECODE = _mulaw_decode_table()


def mulaw_encode(x: np.ndarray) -> bytes:
    """Float samples to G.711 mu-law bytes (bias 0x84, clip 32635), vectorised."""
    s = np.clip(np.rint(_finite(x) * 32768.0), -32768, 32767)
    s = s.astype(np.int32)
    sign = np.where(s < 0, 0x80, 0)
    mag = np.minimum(np.abs(s), _MULAW_CLIP) + _MULAW_BIAS
    exponent = _MULAW_EXP[mag >> 7]
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def mulaw_decode(b: bytes) -> np.ndarray:
    """G.711 mu-law bytes to float32 samples."""
    return _MULAW_DECODE[np.frombuffer(b, dtype=np.uint8)].astype(np.float32) / np.float32(32768.0)


# A-law: 13-bit magnitudes in eight segments; even bits inverted on the wire (XOR 0x55), sign bit set for positive
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    segment = (a & 0x70) >> 4
    t = ((a & 0x0F) << 4) + np.where(segment == 0, 8, 0x108)
    t = np.where(segment > 1, t << np.maximum(segment - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ALAW_DECODE = _alaw_decode_table()


def alaw_encode(x: np.ndarray) -> bytes:
    """Float samples to G.711 A-law bytes, vectorised."""
    s = np.clip(np.rint(_finite(x) * 32768.0), -32768, 32767)
    s = s.astype(np.int32) >> 3  # 13-bit
    mask = np.where(s >= 0, 0xD5, 0x55)
    mag = np.where(s >= 0, s, -s - 1)
    segment = np.searchsorted(_ALAW_SEGMENT_ENDS, mag)  # first end >= mag; 8 when over the top
    shift = np.where(segment < 2, 1, segment)
    value = (np.minimum(segment, 7) << 4) | ((mag >> shift) & 0x0F)
    value = np.where(segment >= 8, 0x7F, value)
    return ((value ^ mask) & 0xFF).astype(np.uint8).tobytes()


def alaw_decode(b: bytes) -> np.ndarray:
    """G.711 A-law bytes to float32 samples."""
    return _ALAW_DECODE[np.frombuffer(b, dtype=np.uint8)].astype(np.float32) / np.float32(32768.0)


# ---------------------------------------------------------------------------------------------------- encoder


class AudioEncoder:
    """Streaming encoder from engine PCM (float32 mono at ``input_rate``) to wire packets of one frame each."""

    def __init__(self, fmt: OutputFormat, input_rate: int, *, complexity: int = OPUS_COMPLEXITY) -> None:
        if isinstance(input_rate, bool) or not isinstance(input_rate, (int, np.integer)):
            raise ValueError(f"input_rate must be an integer, got {type(input_rate).__name__}")
        if not 4000 <= input_rate <= 192_000:
            raise ValueError(f"input_rate must be within [4000, 192000], got {input_rate}")
        self.format = fmt
        self.input_rate = int(input_rate)
        self._spf = fmt.samples_per_frame
        self._rs: soxr.ResampleStream | None = None
        self._pending = np.zeros(0, dtype=np.float32)
        self.frames_out = 0
        self._opus: opuslib_next.Encoder | None = None
        if fmt.codec == "opus":
            self._opus = opuslib_next.Encoder(fmt.sample_rate, 1, opuslib_next.APPLICATION_AUDIO)
            self._opus.bitrate = fmt.bitrate
            self._opus.signal = opuslib_next.SIGNAL_VOICE
            if isinstance(complexity, bool) or not isinstance(complexity, int) or not 0 <= complexity <= 10:
                raise ValueError(f"complexity must be an integer within [0, 10], got {complexity!r}")
            self._opus.complexity = complexity
            self._opus_state = ctypes.cast(self._opus.encoder_state, ctypes.c_void_p).value
            self._packet = ctypes.create_string_buffer(_OPUS_MAX_PACKET)

    @property
    def frame_ms(self) -> int:
        return self.format.frame_ms

    @property
    def ms_out(self) -> int:
        return self.frames_out * self.format.frame_ms

    @property
    def codec_delay(self) -> int:
        """Samples (at the output rate) by which decoded Opus lags the input; 0 for pcm16 and G.711."""
        return int(self._opus.lookahead) if self._opus is not None else 0

    def push(self, pcm: np.ndarray) -> list[bytes]:
        """Add samples; returns one packet per frame completed."""
        x = np.asarray(pcm, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"pcm must be mono (1-D), got shape {x.shape}")
        if self.input_rate != self.format.sample_rate and x.size:
            if self._rs is None:
                self._rs = soxr.ResampleStream(self.input_rate, self.format.sample_rate, 1, dtype="float32", quality="HQ")
            x = self._rs.resample_chunk(np.ascontiguousarray(x))
        return self._emit(x)

    def flush(self) -> list[bytes]:
        """Drain the resampler and pad the last partial frame with silence. The encoder stays usable."""
        tail = np.zeros(0, dtype=np.float32)
        if self._rs is not None:
            tail = self._rs.resample_chunk(tail, last=True)
            self._rs = None
        packets = self._emit(tail)
        if self._pending.size:
            packets += self._emit(np.zeros(self._spf - self._pending.size, dtype=np.float32))
        return packets

    def _emit(self, x: np.ndarray) -> list[bytes]:
        buf = np.concatenate((self._pending, x)) if self._pending.size else x
        n = buf.size // self._spf
        self._pending = buf[n * self._spf :].copy()
        if not n:
            return []
        frames = buf[: n * self._spf].reshape(n, self._spf)
        self.frames_out += n
        if self._opus is not None:  # the sample codecs clean their own input
            return self._encode_opus(np.clip(_finite(frames), -1.0, 1.0))
        data = _SAMPLE_CODECS[self.format.codec](frames)
        size = len(data) // n
        return [data[i * size : (i + 1) * size] for i in range(n)]

    def _encode_opus(self, frames: np.ndarray) -> list[bytes]:
        """One packet per row of ``frames`` (n, samples per frame)."""
        state, spf, out = self._opus_state, self._spf, self._packet
        frames = np.ascontiguousarray(frames, dtype=np.float32)  # (n, spf) rows read in place by libopus
        at, stride = frames.ctypes.data, frames.strides[0]
        packets = []
        for i in range(frames.shape[0]):
            size = _opus_encode_float(state, at + i * stride, spf, out, _OPUS_MAX_PACKET)
            if size < 0:
                raise opuslib_next.OpusError(size)
            packets.append(ctypes.string_at(out, size))
        return packets


_SAMPLE_CODECS = {"pcm16": float_to_pcm16, "mulaw": mulaw_encode, "alaw": alaw_encode}


def decode_opus(packets: Iterable[bytes], sample_rate: int = 48000) -> np.ndarray:
    """Decode a sequence of mono Opus packets (one stream) to float32 at ``sample_rate``."""
    dec = opuslib_next.Decoder(sample_rate, 1)
    max_frame = _OPUS_MAX_FRAME_48K * sample_rate // 48000
    out = [np.frombuffer(dec.decode_float(bytes(p), max_frame), dtype=np.float32) for p in packets]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------- files


def write_wav(path_or_file: str | os.PathLike[str] | BinaryIO, pcm_float: np.ndarray, sample_rate: int) -> None:
    """Write mono float samples as a 16-bit PCM WAV file."""
    x = np.asarray(pcm_float, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"pcm must be mono (1-D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("pcm contains NaN or infinite samples")
    with wave.open(path_or_file if not isinstance(path_or_file, os.PathLike) else os.fspath(path_or_file), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(float_to_pcm16(x))


def _bitrev8_table() -> bytes:
    return bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


_BITREV8 = _bitrev8_table()


def _ogg_crc(page: bytes) -> int:
    """Ogg's CRC-32 (poly 0x04c11db7, MSB-first, init 0, no final xor), computed with zlib's reflected CRC-32
    over bit-reversed bytes: C speed without a table loop in Python."""
    raw = zlib.crc32(page.translate(_BITREV8), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{raw:032b}"[::-1], 2)


def _ogg_page(packets: list[bytes], granule: int, serial: int, seq: int, flags: int) -> bytes:
    lacing = bytearray()
    for p in packets:
        lacing += b"\xff" * (len(p) // 255) + bytes([len(p) % 255])
    header = b"OggS" + struct.pack("<BBqIIIB", 0, flags, granule, serial, seq, 0, len(lacing)) + lacing
    page = header + b"".join(packets)
    return page[:22] + struct.pack("<I", _ogg_crc(page)) + page[26:]


def write_ogg_opus(
    path_or_file: str | os.PathLike[str] | BinaryIO, pcm_float: np.ndarray, sample_rate: int, bitrate: int = 32000
) -> None:
    """Write mono float samples as an Ogg/Opus file (RFC 7845): 48 kHz, 20 ms packets, one second per page. At
    libopus' highest complexity, not the stream's: a file is encoded once and kept (a voice's reference audio)."""
    x = np.asarray(pcm_float, dtype=np.float32)
    enc = AudioEncoder(OutputFormat("opus", 48000, 20, bitrate=bitrate), sample_rate, complexity=10)
    pre_skip = enc.codec_delay
    # pad by the codec delay so the whole input is decodable, then trim it with the final granule position
    packets = enc.push(x) + enc.push(np.zeros(pre_skip * sample_rate // 48000 + 1, np.float32)) + enc.flush()
    end = pre_skip + round(x.size * 48000 / sample_rate)
    serial = zlib.crc32(b"shoal")
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, pre_skip, int(sample_rate), 0, 0)
    vendor = b"shoal"
    tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
    pages = [_ogg_page([head], 0, serial, 0, 0x02), _ogg_page([tags], 0, serial, 1, 0)]
    for i in range(0, len(packets), 50):
        group = packets[i : i + 50]
        last = i + 50 >= len(packets)
        granule = end if last else (i + len(group)) * 960
        pages.append(_ogg_page(group, granule, serial, len(pages), 0x04 if last else 0))
    data = b"".join(pages)
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "wb") as f:
            f.write(data)
    else:
        path_or_file.write(data)


def _read_ogg_opus(data: bytes) -> tuple[np.ndarray, int]:
    packets: list[bytes] = []
    partial: bytearray | None = None
    serial: int | None = None
    granule_end = -1
    pos = 0
    while pos < len(data):
        if data[pos : pos + 4] != b"OggS":
            raise ValueError(f"Ogg: no page at byte {pos} (corrupt or truncated file)")
        if pos + 27 > len(data):
            raise ValueError("Ogg: truncated page header")
        version, flags, granule, ser, _seq, crc, nseg = struct.unpack_from("<BBqIIIB", data, pos + 4)
        lacing = data[pos + 27 : pos + 27 + nseg]
        end = pos + 27 + nseg + sum(lacing)
        if version != 0:
            raise ValueError(f"Ogg: unsupported page version {version}")
        if len(lacing) < nseg or end > len(data):
            raise ValueError("Ogg: truncated page")
        if _ogg_crc(data[pos : pos + 22] + b"\0\0\0\0" + data[pos + 26 : end]) != crc:
            raise ValueError(f"Ogg: checksum mismatch in page at byte {pos} (corrupt file)")
        body, pos = data[end - sum(lacing) : end], end
        if serial is None:
            if not flags & 0x02:
                raise ValueError("Ogg: first page does not start a stream")
            serial = ser
        elif ser != serial:
            continue  # another logical stream (multiplexed): not ours
        if bool(flags & 0x01) != (partial is not None):
            raise ValueError("Ogg: broken packet continuation (missing or corrupt page)")
        cur = partial if partial is not None else bytearray()
        off = 0
        for v in lacing:
            cur += body[off : off + v]
            off += v
            if v < 255:
                packets.append(bytes(cur))
                cur = bytearray()
        partial = cur if nseg and lacing[-1] == 255 else None
        if granule != -1:
            granule_end = granule
        if flags & 0x04:
            break
    if partial is not None:
        raise ValueError("Ogg: truncated (last packet incomplete)")
    if not packets or not packets[0].startswith(b"OpusHead") or len(packets[0]) < 19:
        raise ValueError("Ogg: not an Opus stream (no OpusHead)")
    version, channels, pre_skip, _rate, gain, mapping = struct.unpack_from("<BBHIhB", packets[0], 8)
    if version >> 4 != 0 or channels == 0:
        raise ValueError(f"Ogg: unsupported OpusHead (version {version}, {channels} channels)")
    if mapping != 0 or channels > 2:
        raise ValueError(f"Ogg: unsupported Opus channel mapping {mapping} ({channels} channels); use mono or stereo")
    if len(packets) < 2 or not packets[1].startswith(b"OpusTags"):
        raise ValueError("Ogg: missing OpusTags header")
    dec = opuslib_next.Decoder(48000, channels)
    out: list[np.ndarray] = []
    for p in packets[2:]:
        if p:
            try:
                out.append(np.frombuffer(dec.decode_float(p, _OPUS_MAX_FRAME_48K), dtype=np.float32))
            except opuslib_next.OpusError as e:
                raise ValueError(f"Ogg: corrupt Opus packet ({e})") from None
    pcm = np.concatenate(out).reshape(-1, channels).mean(axis=1) if out else np.zeros(0, np.float32)
    stop = granule_end if pre_skip <= granule_end <= pcm.size else pcm.size
    pcm = pcm[pre_skip:stop]
    if gain:
        pcm = pcm * np.float32(10 ** (gain / (256 * 20)))
    return pcm.astype(np.float32), 48000


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(frames)
    except (wave.Error, EOFError, struct.error) as e:
        why = str(e) or "truncated header"
        raise ValueError(f"unsupported or corrupt WAV ({why}); expected 8/16/24/32-bit integer PCM") from None
    if channels < 1 or width not in (1, 2, 3, 4):
        raise ValueError(f"unsupported WAV: {channels} channels, {8 * width}-bit samples")
    if len(raw) < frames * channels * width:
        raise ValueError(f"truncated WAV: header declares {frames} frames, data holds {len(raw) // (channels * width)}")
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 8388608.0
    else:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    return x.reshape(-1, channels).mean(axis=1, dtype=np.float32), rate


def read_audio_bytes(data: bytes, pcm_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Decode uploaded audio to (float32 mono, sample_rate): WAV (integer PCM, any channel count, mixed to mono),
    Ogg/Opus (decoded at 48 kHz), or raw PCM16 little-endian mono when the caller gives ``pcm_rate``.
    Raises ValueError for anything else (empty, truncated, unsupported, non-finite)."""
    data = bytes(data)
    if not data:
        raise ValueError("audio is empty")
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        x, rate = _read_wav(data)
    elif data[:4] == b"OggS":
        x, rate = _read_ogg_opus(data)
    elif pcm_rate is not None:
        if isinstance(pcm_rate, bool) or not isinstance(pcm_rate, int):
            raise ValueError(f"pcm_rate must be an integer, got {type(pcm_rate).__name__}")
        x, rate = pcm16_to_float(data), pcm_rate
    else:
        raise ValueError("unrecognised audio format: expected WAV, Ogg/Opus, or raw PCM16 with its sample rate")
    if not 4000 <= rate <= 192_000:
        raise ValueError(f"unsupported sample rate {rate} Hz (must be within [4000, 192000])")
    if x.size == 0:
        raise ValueError("audio contains no samples")
    if not np.isfinite(x).all():
        raise ValueError("audio contains NaN or infinite samples")
    return np.ascontiguousarray(x, dtype=np.float32), int(rate)
