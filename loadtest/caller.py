"""The simulated caller's voice (telephony), and what listening to it costs the server.

:class:`CallerVoice` is what every simulated phone line sends, as 20 ms mu-law 8 kHz frames: a quiet line (noise
at -60 dBFS, never speech) and, to speak over the bot, one short utterance made once per process with the built-in
voice (``engine.espeak``) and resampled to 8 kHz, as a phone line carries it. ``onset_ms`` is where its sound
starts (the first 10 ms louder than -40 dBFS): the instant the caller starts speaking, from which the onset-to-
``clear`` latency is measured.

:func:`vad_cost` times, in this process, the work the server does per second of a call's audio on its input path
(``realtime.caller.InputStream``: mu-law decode, upsampling to 16 kHz, the kept ring) and the Silero voice activity
(``realtime.vad.VoiceActivity``) alone, fed the audio exactly as the input stream upsampled it, 20 ms at a time.

These two reach past the wire on purpose: the utterance is the built-in voice's, and the benchmark measures the
server's own code. Everything else of the load test talks to the server only over the wire.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

UTTERANCE = "Wait, stop, I have a question about that."
UTTERANCE_SPEAKER = 3  # a timbre of the built-in voice unlike the bot's speakers 0 and 1
RATE = 8000
FRAME = 160  # samples (and mu-law bytes) in 20 ms at 8 kHz
FRAME_MS = 20.0
NOISE_DBFS = -60.0
NOISE_FRAMES = 50  # one second of line noise, sent round and round


def onset_ms(pcm: np.ndarray, rate: int) -> float:
    """Where a sound starts: the first 10 ms whose RMS is above -40 dBFS (0.01)."""
    hop = rate // 100
    rms = np.sqrt(np.mean(pcm[: pcm.size // hop * hop].reshape(-1, hop) ** 2, axis=1))
    loud = np.flatnonzero(rms > 0.01)
    if not loud.size:
        raise ValueError("the utterance is silent")
    return float(loud[0] * 10)


def frames(pcm: np.ndarray) -> list[bytes]:
    """Float samples at 8 kHz -> 20 ms mu-law frames (the last one padded with silence)."""
    from realtime.audio import mulaw_encode

    padded = np.pad(pcm.astype(np.float32), (0, -pcm.size % FRAME))
    return [mulaw_encode(padded[i : i + FRAME]) for i in range(0, padded.size, FRAME)]


def line_noise(seconds: float, seed: int) -> np.ndarray:
    """A quiet phone line: white noise at NOISE_DBFS (deterministic)."""
    level = 10.0 ** (NOISE_DBFS / 20.0)
    return (np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * level).astype(np.float32)


async def _speak(text: str, speaker: int) -> np.ndarray:
    import soxr

    from engine.base import SynthesisRequest
    from engine.espeak import SAMPLE_RATE, EspeakConfig, EspeakSynthesizer

    engine = EspeakSynthesizer(EspeakConfig(workers=1, language="en-us"))
    await engine.start()
    try:
        pcm = np.concatenate([c.pcm async for c in engine.synthesize(SynthesisRequest(text, speaker=speaker))])
    finally:
        await engine.aclose()
    return np.asarray(soxr.resample(pcm, SAMPLE_RATE, RATE), dtype=np.float32)


@functools.cache
def utterance_8k() -> np.ndarray:
    """The caller's utterance, made with the built-in voice once per process, at 8 kHz."""
    pcm = asyncio.run(_speak(UTTERANCE, UTTERANCE_SPEAKER))
    pcm.setflags(write=False)
    return pcm


def b64(frame: bytes) -> str:
    return base64.b64encode(frame).decode("ascii")


@dataclass(frozen=True)
class CallerVoice:
    """What a simulated line sends: quiet-line frames and the utterance's frames, base64 as Twilio sends them."""

    noise: tuple[str, ...]
    utterance: tuple[str, ...]
    onset_ms: float  # where the utterance's sound starts, from its first frame

    @classmethod
    def make(cls, seed: int = 1, pcm: np.ndarray | None = None) -> CallerVoice:
        """The voice for a run (``pcm``: the utterance at 8 kHz; default the built-in voice's)."""
        speech = utterance_8k() if pcm is None else pcm
        return cls(
            noise=tuple(b64(f) for f in frames(line_noise(NOISE_FRAMES * FRAME_MS / 1000.0, seed))),
            utterance=tuple(b64(f) for f in frames(speech)),
            onset_ms=onset_ms(speech, RATE),
        )

    @property
    def utterance_ms(self) -> float:
        return len(self.utterance) * FRAME_MS


def _timed(fn: Any, items: list[Any]) -> tuple[float, int]:
    """CPU seconds (this process, every thread) to call ``fn`` on each item; and the events it returned."""
    events = 0
    start = time.process_time()
    for item in items:
        events += len(fn(item))
    return time.process_time() - start, events


def vad_cost(seconds: float, speech: np.ndarray, seed: int = 1) -> dict[str, Any]:
    """CPU the server spends per second of one call's audio: its input path and the voice activity alone.

    ``seconds`` of line audio (the utterance, then 1.5 s of quiet line, over and over) as 20 ms mu-law frames
    through an ``InputStream`` without voice activity (decode, upsample, keep), then the 16 kHz audio it kept
    through a ``VoiceActivity`` 20 ms at a time. Both after a warm-up; ``process_time`` of this process."""
    from realtime import vad
    from realtime.caller import InputFormat, InputStream
    from realtime.vad import VAD_RATE, VoiceActivity

    gap = line_noise(1.5, seed)
    reps = int(np.ceil(seconds * RATE / (speech.size + gap.size)))
    line = np.tile(np.concatenate([speech, gap]), max(1, reps))[: int(seconds * RATE)]
    packets = frames(line)
    vad.load()
    fmt = InputFormat(codec="mulaw", sample_rate=RATE, vad=False, barge_in=False)
    warm = InputStream(InputFormat(codec="mulaw", sample_rate=RATE))
    for packet in packets[:50]:  # warm-up: the resampler, the model's first runs
        warm.push(packet)
    stream = InputStream(fmt)
    input_s, _ = _timed(stream.push, packets)
    upsampled = stream.audio(0.0, stream.ms)
    step = VAD_RATE // 50
    chunks = [upsampled[i : i + step] for i in range(0, upsampled.size, step)]
    activity = VoiceActivity(InputFormat(codec="mulaw", sample_rate=RATE).vad_config)
    vad_s, events = _timed(activity.feed, chunks)
    audio_s = len(packets) * FRAME_MS / 1000.0
    return {
        "audio_s": round(audio_s, 3),
        "input_ms_per_s": round(input_s * 1000.0 / audio_s, 3),  # decode + upsample + keep, per second of audio
        "vad_ms_per_s": round(vad_s * 1000.0 / audio_s, 3),  # Silero on the upsampled audio, per second of audio
        "per_call_pct": round((input_s + vad_s) * 100.0 / audio_s, 3),  # % of one core per call, both together
        "vad_per_call_pct": round(vad_s * 100.0 / audio_s, 3),
        "speech_events": events,  # started/stopped: the utterances were heard
        "utterances": reps,
    }
