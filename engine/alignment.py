"""Word timing for engines that give none (S2 Pro, torch and SGLang): estimated after the audio is made.

The model reports no alignment, so :class:`ProportionalAligner` estimates one. The built-in voice says the same
text and reports exactly when each of its words and phonemes starts; the real audio's speech span (its first and
last loud 10 ms, found by energy) is then shared among the words in proportion to those durations, pauses
included. Word order, pauses at punctuation and the relative length of long and short words carry over well; what a
proportional map cannot know is where the model itself lingered, so a word may be off by a syllable in a long
segment. The result is flagged ``estimated``.

It sits behind the small :class:`Aligner` interface so a forced aligner (CTC over the audio, for example) can
replace it without touching the gateway.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from engine.base import EngineError, PhonemeTiming, SynthesisRequest, Synthesizer, Timing, WordTiming

__all__ = ["Aligner", "ProportionalAligner", "speech_span"]

log = logging.getLogger(__name__)

_WINDOW_S = 0.010


class Aligner(Protocol):
    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def align(self, text: str, speaker: int, pcm: np.ndarray, sample_rate: int) -> Timing | None:
        """Timing of ``text`` (a request's text, markup included) as spoken in ``pcm``; None if it cannot tell."""


def speech_span(pcm: np.ndarray, sample_rate: int) -> tuple[int, int]:
    """(first, last) sample of the speech in ``pcm``: the first and last 10 ms window louder than a tenth of the
    loud windows' level. The whole of it when nothing stands out."""
    window = max(1, round(sample_rate * _WINDOW_S))
    count = pcm.size // window
    if count == 0:
        return 0, pcm.size
    frames = np.asarray(pcm[: count * window], dtype=np.float32).reshape(count, window)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    loud = float(np.percentile(rms, 90))
    if loud <= 1e-4:
        return 0, pcm.size
    active = np.flatnonzero(rms > 0.1 * loud)
    return int(active[0]) * window, min(pcm.size, (int(active[-1]) + 1) * window)


class ProportionalAligner:
    """See the module docstring. ``reference``: an engine with exact timing (the built-in voice), owned here."""

    def __init__(self, reference: Synthesizer) -> None:
        if not reference.info.timing:
            raise ValueError(f"the {reference.info.name} engine reports no timing to align with")
        self.reference = reference

    async def start(self) -> None:
        """Raises EngineError if the reference engine cannot work (then there is no timing to spread)."""
        await self.reference.start()
        problem = self.reference.health()
        if problem is not None:
            raise EngineError(f"{self.reference.info.name}: {problem}")

    async def aclose(self) -> None:
        await self.reference.aclose()

    async def align(self, text: str, speaker: int, pcm: np.ndarray, sample_rate: int) -> Timing | None:
        made = 0
        timing: Timing | None = None
        async for chunk in self.reference.synthesize(SynthesisRequest(text=text, speaker=speaker)):
            made += chunk.pcm.size
            timing = chunk.timing or timing
        if timing is None or not timing.words or pcm.size == 0:
            return None
        ref_rate = self.reference.info.sample_rate
        ref_first, ref_last = timing.words[0].start, timing.words[-1].end
        first, last = speech_span(pcm, sample_rate)
        scale = (last - first) / max(1, ref_last - ref_first)

        def place(sample: int) -> int:
            return round(first + (min(max(sample, ref_first), ref_last) - ref_first) * scale)

        words: list[WordTiming] = []
        for word in timing.words:
            start = max(place(word.start), words[-1].end if words else 0)
            words.append(WordTiming(word.word, start, max(start + 1, place(word.end))))
        phonemes = [PhonemeTiming("", 0)] if first > 0 else []
        phonemes += [PhonemeTiming(p.phoneme, place(p.start)) for p in timing.phonemes if ref_first <= p.start < ref_last]
        phonemes.append(PhonemeTiming("", last))
        log.debug("aligned %d words over %d samples (reference %d at %d Hz)", len(words), pcm.size, made, ref_rate)
        return Timing(words=tuple(words), phonemes=tuple(phonemes), estimated=True)
