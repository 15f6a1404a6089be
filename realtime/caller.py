"""The caller's side of a session: the input audio format, its decoding onto one clock, voice activity, and the
recent audio kept for committing a caller turn.

Sans-I/O like the turn machine: ``InputStream.push(data)`` takes one ``input.audio`` payload and returns the voice
activity events it completes; ``InputStream.audio(start_ms, end_ms)`` cuts what the caller said out of the recent
audio. The gateway runs ``push`` off the event loop (the model and the resampler release the GIL).

The input clock starts at the stream's first sample (the first ``input.audio`` after ``input`` was set) and counts
the samples received, so ``input.speech_started.ms`` and ``input.commit``'s ``start_ms`` / ``end_ms`` name the same
instants whatever the network did to the frames' timing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import opuslib_next
import soxr

from realtime.audio import alaw_decode, mulaw_decode, pcm16_to_float
from realtime.protocol import Audio
from realtime.vad import VAD_RATE, VadConfig, VoiceActivity

__all__ = ["INPUT_CODECS", "CallLink", "InputFormat", "InputStream", "KEEP_S"]

INPUT_CODECS = ("pcm16", "mulaw", "alaw", "opus")
_RATES = {"pcm16": (8000, 16000, 22050, 24000, 44100, 48000), "mulaw": (8000,), "alaw": (8000,),
          "opus": (8000, 12000, 16000, 24000, 48000)}
KEEP_S = 60  # recent caller audio kept for input.commit, at 16 kHz (1.9 MB as int16)
MAX_FRAME_MS = 120  # one input.audio payload holds at most this much audio (Opus's longest packet)


@dataclass(frozen=True)
class InputFormat:
    """The ``input`` settings of protocol v1 (session.start / session.update)."""

    codec: str = "pcm16"
    sample_rate: int = 16000
    vad: bool = True  # "on" | "off" on the wire (booleans accepted)
    barge_in: bool = True  # speech while a turn plays cancels it (needs vad)
    threshold: float = 0.5
    min_speech_ms: int = 96
    min_silence_ms: int = 500

    def __post_init__(self) -> None:
        if not isinstance(self.codec, str) or self.codec not in INPUT_CODECS:
            raise ValueError(f"input.codec must be one of {', '.join(INPUT_CODECS)}, got {self.codec!r}")
        if isinstance(self.sample_rate, bool) or self.sample_rate not in _RATES[self.codec]:
            rates = ", ".join(map(str, _RATES[self.codec]))
            raise ValueError(f"input.sample_rate for {self.codec} must be one of {rates}, got {self.sample_rate!r}")
        for name in ("vad", "barge_in"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"input.{name} must be on or off")
        if self.barge_in and not self.vad:
            raise ValueError("input.barge_in needs input.vad on (speech is what interrupts)")
        self.vad_config  # validates the thresholds  # noqa: B018

    @property
    def vad_config(self) -> VadConfig:
        return VadConfig(self.threshold, self.min_speech_ms, self.min_silence_ms)

    @classmethod
    def from_wire(cls, d: Mapping[str, object] | None, base: InputFormat | None = None) -> InputFormat | None:
        """Settings from a wire map (unknown keys ignored, missing ones from ``base``); None without either."""
        if d is None:
            return base
        if not isinstance(d, Mapping):
            raise ValueError(f"input must be a map, got {type(d).__name__}")
        start = base or cls()
        values = {k: d[k] for k in asdict(start) if d.get(k) is not None}
        for name in ("vad", "barge_in"):
            if values.get(name) in ("on", "off"):
                values[name] = values[name] == "on"
        codec = values.get("codec", start.codec)
        if "sample_rate" not in values and isinstance(codec, str) and start.sample_rate not in _RATES.get(codec, ()):
            values["sample_rate"] = 8000 if codec in ("mulaw", "alaw") else 16000  # the rate follows the codec
        if "vad" in values and "barge_in" not in values:
            values["barge_in"] = values["vad"]  # barge-in follows voice activity unless asked otherwise
        return cls(**{**asdict(start), **values})  # type: ignore[arg-type]

    def to_wire(self) -> dict[str, object]:
        wire: dict[str, object] = asdict(self)
        wire["vad"] = "on" if self.vad else "off"
        return wire


class InputStream:
    """One connection's caller audio: decoded, on one clock, watched for speech, the last ``KEEP_S`` s kept."""

    def __init__(self, fmt: InputFormat) -> None:
        self.format = fmt
        self.received = 0  # samples at the input rate since the stream started: the input clock
        self.samples = 0  # ... and at VAD_RATE, as far as the resampler has given them (it holds back a little)
        # up from telephone rates, cubic interpolation (no delay); down from wideband, a filter of 26 ms delay
        quality = "QQ" if fmt.sample_rate < VAD_RATE else "MQ"
        self._resampler = None if fmt.sample_rate == VAD_RATE else soxr.ResampleStream(
            fmt.sample_rate, VAD_RATE, 1, dtype="float32", quality=quality)
        self._opus = opuslib_next.Decoder(fmt.sample_rate, 1) if fmt.codec == "opus" else None
        self._vad = VoiceActivity(fmt.vad_config) if fmt.vad else None
        self._keep = np.zeros(KEEP_S * VAD_RATE, dtype=np.int16)  # a ring: sample n lives at n % size

    @property
    def ms(self) -> float:
        """Where the input clock is: the audio received so far."""
        return self.received * 1000.0 / self.format.sample_rate

    @property
    def speaking(self) -> bool:
        return self._vad is not None and self._vad.speaking

    def decode(self, data: bytes) -> np.ndarray:
        """One payload to float32 at the input rate. Raises ValueError for data that cannot be this codec's."""
        codec = self.format.codec
        if not data:
            raise ValueError("input.audio data is empty")
        if codec == "opus":
            assert self._opus is not None
            try:
                pcm16 = self._opus.decode(data, self.format.sample_rate * MAX_FRAME_MS // 1000)
            except opuslib_next.OpusError as exc:
                raise ValueError(f"input.audio data is not an Opus packet ({exc})") from None
            return pcm16_to_float(pcm16)
        if codec == "pcm16":
            if len(data) % 2:
                raise ValueError(f"pcm16 input.audio needs an even number of bytes, got {len(data)}")
            pcm = pcm16_to_float(data)
        else:
            pcm = mulaw_decode(data) if codec == "mulaw" else alaw_decode(data)
        if pcm.size > self.format.sample_rate * MAX_FRAME_MS // 1000:
            raise ValueError(f"one input.audio holds at most {MAX_FRAME_MS} ms of audio, got "
                             f"{pcm.size * 1000 // self.format.sample_rate} ms")
        return pcm

    def push(self, data: bytes) -> list[tuple[str, float]]:
        """Take one ``input.audio`` payload: decode, keep, watch. Returns VAD events ``(kind, ms)``. Raises
        ValueError (and changes nothing) for a payload that is not this stream's codec."""
        pcm = self.decode(data)
        self.received += pcm.size
        if self._resampler is not None:
            pcm = self._resampler.resample_chunk(np.ascontiguousarray(pcm))
        if not pcm.size:
            return []
        size = self._keep.size
        index = (self.samples + np.arange(pcm.size)) % size
        self._keep[index] = np.clip(np.rint(pcm * 32767.0), -32768, 32767).astype(np.int16)
        self.samples += pcm.size
        return self._vad.feed(pcm) if self._vad is not None else []

    def audio(self, start_ms: float, end_ms: float) -> np.ndarray:
        """The caller's audio between two instants of the input clock (float32, ``VAD_RATE``). Raises ValueError if
        the span is not within what is kept."""
        if not (math.isfinite(start_ms) and math.isfinite(end_ms) and 0 <= start_ms < end_ms):
            raise ValueError("input.commit needs 0 <= start_ms < end_ms")
        first, last = round(start_ms * VAD_RATE / 1000), round(end_ms * VAD_RATE / 1000)
        if last > self.samples + round(0.05 * VAD_RATE):
            raise ValueError(f"input.commit end_ms {end_ms:g} is past the input received ({self.ms:.0f} ms)")
        last = min(last, self.samples)  # what the resampler still holds is silence at the very end
        if first < self.samples - self._keep.size:
            raise ValueError(f"input.commit start_ms {start_ms:g} is older than the last {KEEP_S} s of input kept")
        index = np.arange(first, max(first, last)) % self._keep.size
        return self._keep[index].astype(np.float32) / np.float32(32768.0)


class CallLink(Protocol):
    """A phone call joined to a live session (``realtime/twilio.py``): the session's listener and its input.

    While it is joined, the session's audio goes to the call instead of the application's socket, in the call's
    ``output`` settings, and the call's audio is the session's input (``input``)."""

    output: Mapping[str, object]  # OutputFormat fields the call needs (codec, sample_rate, frame_ms)
    input: InputFormat

    async def send_audio(self, msg: Audio) -> None:
        """Play one packet of the session's audio."""

    async def boundary(self, turn: int, ms: float) -> None:
        """The audio of ``turn`` up to ``ms`` is queued: place a mark there (its echo says it was played)."""

    def clear(self) -> None:
        """Drop what the call has buffered (barge-in)."""

    def heard_ms(self, turn: int, at: float) -> float | None:
        """How much of ``turn`` the caller had heard at monotonic time ``at``, from the mark echoes; None if the
        call cannot tell."""

    async def end(self, reason: str) -> None:
        """The session is over (its application left): close the call's stream."""
