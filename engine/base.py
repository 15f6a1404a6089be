"""The one narrow interface between the gateway and every synthesizer.

A synthesizer turns a request (new text plus the session's context) into a stream of audio chunks. The
consumer drives it: chunks are produced as they are pulled (so a slow consumer throttles the engine), and
closing the iterator (``aclose()``, or cancelling the task that iterates) stops generation at the next
step. Engines never see the store or the wire: they get plain, immutable context objects.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "AudioChunk",
    "EngineError",
    "EngineInfo",
    "PastTurn",
    "PhonemeTiming",
    "Sampling",
    "SynthesisRequest",
    "Synthesizer",
    "Timing",
    "VoiceRef",
    "WordTiming",
    "engine_stats",
]


class EngineError(Exception):
    """The engine could not do what was asked (unavailable, crashed, bad request for this engine)."""


@dataclass(frozen=True)
class EngineInfo:
    name: str
    sample_rate: int  # rate of AudioChunk.pcm
    cloning: bool  # can it speak in a registered reference voice?
    frame_ms: float | None = None  # codec frame duration for frame-based engines (S2 Pro: 1000 / 21.5)
    timing: bool = False  # does it report when each word is spoken (AudioChunk.timing)?

    def to_wire(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "sample_rate": self.sample_rate, "cloning": self.cloning}
        if self.frame_ms is not None:
            out["frame_ms"] = self.frame_ms
        out["timing"] = "exact" if self.timing else "none"
        return out


@dataclass(frozen=True)
class Sampling:
    """Per-session sampling settings (used by model engines; deterministic engines ignore most of them)."""

    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 30
    seed: int | None = None
    max_frames: int = 2048  # per turn

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise ValueError("temperature must be a finite number")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be within [0, 2]")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be within (0, 1]")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and 0 <= self.top_k <= 4096):
            raise ValueError("top_k must be an integer within [0, 4096] (0 = off)")
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise ValueError("seed must be an integer")
        if not (isinstance(self.max_frames, int) and not isinstance(self.max_frames, bool)):
            raise ValueError("max_frames must be an integer")
        if not 1 <= self.max_frames <= 20_000:
            raise ValueError("max_frames must be within [1, 20000]")


@dataclass(frozen=True)
class VoiceRef:
    """A registered reference voice as the engine sees it."""

    voice: str  # id
    text: str  # transcript of the reference audio
    codes: np.ndarray | None = None  # (10, frames) int16 codec codes, for cloning engines


@dataclass(frozen=True)
class PastTurn:
    """An earlier turn of the conversation (or an earlier segment of the current turn)."""

    speaker: int
    text: str
    codes: np.ndarray | None = None  # (10, frames) int16, when the engine produced codes


@dataclass(frozen=True)
class SynthesisRequest:
    text: str  # may contain <|speaker:N|> tags and [bracket] instructions
    speaker: int = 0  # speaker of the text up to its first speaker tag
    voices: Mapping[int, VoiceRef] = field(default_factory=dict)  # speaker index -> voice in use
    history: Sequence[PastTurn] = ()  # oldest first
    sampling: Sampling = field(default_factory=Sampling)
    session: str | None = None  # the conversation this belongs to: routing key for worker pools, never content


@dataclass(frozen=True)
class WordTiming:
    """When one word of the request's spoken text is heard. ``word`` indexes ``engine.markup.spoken_words(text)``."""

    word: int
    start: int  # samples from the start of the request's audio
    end: int  # exclusive; start < end


@dataclass(frozen=True)
class PhonemeTiming:
    phoneme: str  # IPA ("" = a pause), stress and length marks included as the engine gives them
    start: int  # samples from the start of the request's audio; each lasts until the next one's start


@dataclass(frozen=True)
class Timing:
    """When the words of a request are heard: every spoken word once, in order, with its phonemes.

    ``complete``: every word the request's audio speaks is here. An engine that learns the timing as it goes may
    send what it knows so far on earlier chunks (``complete`` False: the words that have started, the last one's
    end provisional), so a barge-in mid-request still cuts at a word; each replaces the one before."""

    words: tuple[WordTiming, ...]
    phonemes: tuple[PhonemeTiming, ...] = ()
    estimated: bool = False  # spread over the audio by an aligner, not reported by the engine
    complete: bool = True


@dataclass(frozen=True)
class AudioChunk:
    pcm: np.ndarray  # (n,) float32 mono in [-1, 1] at EngineInfo.sample_rate
    codes: np.ndarray | None = None  # (10, frames) int16 codes of the frames this chunk decodes, if any
    # engines with EngineInfo.timing: the request's timing, complete on the first chunk by which it is known (and
    # before that, optionally, what is known so far); engines without leave it to an aligner
    timing: Timing | None = None


@runtime_checkable
class Synthesizer(Protocol):
    info: EngineInfo

    async def start(self) -> None:
        """Acquire resources (processes, weights). Called once before use."""

    async def aclose(self) -> None:
        """Release everything; in-flight streams end."""

    def health(self) -> str | None:
        """None when ready to synthesize, else a short reason."""

    def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        """Stream audio for ``request.text``. Pull-driven; close the iterator to cancel.

        Raises EngineError (from the iterator) when synthesis fails.
        """

    async def encode_voice(self, pcm: np.ndarray, sample_rate: int, text: str) -> np.ndarray | None:
        """Turn reference audio (float32 mono) into codes once, at registration. None if the engine cannot clone."""


def engine_stats(engine: Synthesizer) -> Mapping[str, float]:
    """An engine's counters for /metrics (prefix cache hits, bytes held, ...), if it has a ``stats()`` method.

    Optional part of the interface: ``stats() -> Mapping[str, float]``, names in snake_case, cumulative counts
    ending in ``_total``, the rest gauges.
    """
    stats = getattr(engine, "stats", None)
    if not callable(stats):
        return {}
    found = stats()
    if dataclasses.is_dataclass(found) and not isinstance(found, type):
        found = dataclasses.asdict(found)
    if not isinstance(found, Mapping):
        return {}
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
