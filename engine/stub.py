"""A test instrument with a GPU's cadence: deterministic tones and fake codec codes, no model.

It waits ``ttft_ms`` before the first frame, then emits one codec frame (2048 samples at 44.1 kHz, about
1000 / 21.5 ms, and its (10, 1) codes) every ``frame_ms``, sleeping between pulls, so a slow consumer slows it.
The tone's pitch depends on the speaker, its voice and the text; an envelope makes it non-constant. About one
frame per 1.2 characters of spoken text (markup is not spoken), at least one per piece of text, at most
``sampling.max_frames``. Everything is a pure function of the request, so equal requests give equal audio.

Its word timing (on the first chunk) is exact by construction: each piece's frames are shared among its words by
character position, and each letter of a word is its "phoneme", so tests can compute every value themselves.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from engine.base import AudioChunk, EngineError, EngineInfo, PhonemeTiming, SynthesisRequest, Timing, WordTiming
from engine.markup import is_word, split_markup, word_runs

__all__ = ["FRAME_MS", "StubConfig", "StubSynthesizer", "fake_codes", "stub_timing"]

FRAME_MS = 1000 / 21.5  # the codec frame the stub imitates (S2 Pro)
_SAMPLE_RATES = (16000, 22050, 24000, 44100, 48000)
_SEMANTIC_CODES, _RESIDUAL_CODES, _CODEBOOKS = 4096, 1024, 10


@dataclass(frozen=True)
class StubConfig:
    ttft_ms: float = 20.0  # delay before the first frame
    frame_ms: float = 12.0  # delay before each later frame
    sample_rate: int = 44100
    chars_per_frame: float = 1.2
    cloning: bool = False  # if True, encode_voice returns deterministic fake codes

    def __post_init__(self) -> None:
        for name, high in (("ttft_ms", 60_000.0), ("frame_ms", 10_000.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number")
            if not 0 <= value <= high:
                raise ValueError(f"{name} must be within [0, {high:g}]")
        if self.sample_rate not in _SAMPLE_RATES:
            raise ValueError(f"sample_rate must be one of {_SAMPLE_RATES}")
        value = self.chars_per_frame
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.1 <= value <= 100):
            raise ValueError("chars_per_frame must be within [0.1, 100]")
        if not isinstance(self.cloning, bool):
            raise ValueError("cloning must be a bool")

    @property
    def samples_per_frame(self) -> int:
        return round(2048 * self.sample_rate / 44100)


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()


def fake_codes(seed: bytes, frames: int) -> np.ndarray:
    """(10, frames) int16: a semantic code (< 4096) then nine residual codes (< 1024) per frame."""
    rng = np.random.default_rng(int.from_bytes(seed[:8], "big"))
    codes = rng.integers(0, _RESIDUAL_CODES, size=(_CODEBOOKS, frames), dtype=np.int16)
    codes[0] = rng.integers(0, _SEMANTIC_CODES, size=frames, dtype=np.int16)
    return codes


@dataclass(frozen=True)
class _Run:
    """Frames for one piece of text: its tone and its codes."""

    frequency: float  # Hz
    codes: np.ndarray  # (10, frames)
    text: str  # the piece's spoken text


def stub_timing(runs: list[_Run], samples_per_frame: int) -> Timing:
    """Each run's samples shared among its characters: a word spans its characters, each letter is a phoneme
    lasting one character's share, and a pause ("") starts at each word's end."""
    words: list[WordTiming] = []
    phonemes: list[PhonemeTiming] = []
    start = 0
    for run in runs:
        samples = run.codes.shape[1] * samples_per_frame
        at = lambda char: start + samples * char // len(run.text)  # noqa: E731 - sample where character `char` starts
        for first_char, last_char, word in word_runs(run.text):
            if not word:
                continue
            first, last = at(first_char), at(last_char)
            words.append(WordTiming(len(words), first, max(last, first + 1)))
            phonemes.extend(PhonemeTiming(c.lower(), at(first_char + i))
                            for i, c in enumerate(run.text[first_char:last_char]) if is_word(c))
            phonemes.append(PhonemeTiming("", last))
        start += samples
    return Timing(words=tuple(words), phonemes=tuple(phonemes))


def _plan(request: SynthesisRequest, config: StubConfig) -> list[_Run]:
    runs: list[_Run] = []
    left = request.sampling.max_frames
    for piece in split_markup(request.text, request.speaker):
        if left <= 0:
            break
        frames = min(left, max(1, round(len(piece.text) / config.chars_per_frame)))
        left -= frames
        voice = request.voices.get(piece.speaker)
        seed = _digest("stub", piece.speaker, voice.voice if voice else "", piece.text)
        semitones = (piece.speaker * 5) % 24 + seed[8] % 5  # speaker sets the register, text nudges it
        runs.append(_Run(110.0 * 2 ** (semitones / 12), _codes(seed, frames), piece.text))
    return runs


# The instrument must cost next to nothing per frame, so that a load test measures the gateway: its audio is read
# from tables made once (a chunk is a read-only view of one, a new array only at a piece's edges and where the
# table wraps), its codes are made once per piece of text, and nothing is computed per frame.
_TABLE_SECONDS = 8  # a tone repeats after this long
_EDGE = 256  # samples of fade in and out at a piece's edges


@functools.lru_cache(maxsize=128)
def _tone_table(frequency: float, sample_rate: int) -> np.ndarray:
    """A syllable-like tone: two partials, four "syllables" a second, computed once per frequency (read-only)."""
    t = np.arange(_TABLE_SECONDS * sample_rate, dtype=np.float64) / sample_rate
    wave = np.sin(2 * np.pi * frequency * t) + 0.3 * np.sin(4 * np.pi * frequency * t)
    envelope = 0.02 + 0.3 * np.sin(np.pi * 4.0 * t) ** 2
    table = (wave * envelope).astype(np.float32)
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=8)
def _ramp(size: int) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp.flags.writeable = False
    return ramp


@functools.lru_cache(maxsize=1024)
def _codes(seed: bytes, frames: int) -> np.ndarray:
    """``fake_codes``, made once per piece of text and shared (read-only): a conversation repeats its lines."""
    codes = fake_codes(seed, frames)
    codes.flags.writeable = False
    return codes


def _tone(frequency: float, start: int, count: int, sample_rate: int) -> np.ndarray:
    """Samples [start, start + count) of the tone: a read-only view of its table (a new array where it wraps)."""
    table = _tone_table(frequency, sample_rate)
    start %= len(table)
    if start + count <= len(table):
        return table[start : start + count]
    return np.take(table, np.arange(start, start + count), mode="wrap")


class StubSynthesizer:
    """See the module docstring. Options: StubConfig."""

    def __init__(self, config: StubConfig | None = None) -> None:
        self.config = config or StubConfig()
        self.info = EngineInfo(name="stub", sample_rate=self.config.sample_rate, cloning=self.config.cloning,
                               frame_ms=FRAME_MS, timing=True)
        self._started = False
        self._closed = False

    async def start(self) -> None:
        self._started = True

    async def aclose(self) -> None:
        self._closed = True

    def health(self) -> str | None:
        if self._closed:
            return "closed"
        return None if self._started else "not started"

    async def encode_voice(self, pcm: np.ndarray, sample_rate: int, text: str) -> np.ndarray | None:
        if not self.config.cloning:
            return None
        if pcm.ndim != 1 or pcm.size == 0 or sample_rate <= 0:
            raise ValueError("reference audio must be non-empty mono")
        frames = max(1, math.ceil(pcm.size / sample_rate * 1000 / FRAME_MS))
        return fake_codes(_digest("voice", text, np.asarray(pcm, np.float32).tobytes()), frames)

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        if self._closed or not self._started:
            raise EngineError(f"stub engine is {'closed' if self._closed else 'not started'}")
        step = self.config.samples_per_frame
        position = 0  # samples since the start of the request
        delay = self.config.ttft_ms
        runs = _plan(request, self.config)
        timing: Timing | None = stub_timing(runs, step)
        for run in runs:
            for frame in range(run.codes.shape[1]):
                await asyncio.sleep(delay / 1000)
                if self._closed:
                    return
                delay = self.config.frame_ms
                pcm = _tone(run.frequency, position, step, self.config.sample_rate)
                if frame == 0 or frame == run.codes.shape[1] - 1:  # soft edges between pieces: a shaped copy
                    pcm, ramp = pcm.copy(), _ramp(min(step, _EDGE))
                    if frame == 0:
                        pcm[: ramp.size] *= ramp
                    if frame == run.codes.shape[1] - 1:
                        pcm[-ramp.size :] *= ramp[::-1]
                position += step
                yield AudioChunk(pcm=pcm, codes=run.codes[:, frame : frame + 1], timing=timing)
                timing = None
