"""Which espeak-ng voice and prosody speaks each piece of a request (pure functions, no espeak here).

Every speaker gets a stable built-in timbre: a voice variant plus pitch, pitch range and rate. A speaker with
a registered voice gets the timbre picked by a hash of the voice id (SHA-256, so it is the same in every
process and on every machine); distinct voice ids in one request get distinct timbres while the palette
lasts. A bracket instruction changes the delivery of the text after it until the next instruction or speaker
tag: ``[whisper]``, ``[slow]``, ``[fast]``, ``[excited]``, ``[sad]``, ``[shouting]`` (``[normal]`` resets);
any other instruction is ignored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from engine.base import PhonemeTiming, SynthesisRequest, Timing, VoiceRef, WordTiming
from engine.markup import split_markup, word_runs

__all__ = [
    "SAMPLE_RATE",
    "TIMBRES",
    "Prosody",
    "Segment",
    "Timbre",
    "plan_segments",
    "speaker_timbre",
    "style_of",
    "timing_from_events",
    "voice_timbres",
]

SAMPLE_RATE = 22050  # espeak-ng's native rate


class Timbre(NamedTuple):
    variant: str  # espeak-ng variant ("" = the language's default voice)
    pitch: int  # 0..100
    range: int  # 0..100
    rate: int  # words per minute


# Distinct-sounding built-in timbres; speaker N without a registered voice gets TIMBRES[N % len].
TIMBRES: tuple[Timbre, ...] = (
    Timbre("", 50, 50, 175),
    Timbre("f3", 50, 55, 170),
    Timbre("m3", 38, 40, 165),
    Timbre("f1", 58, 60, 180),
    Timbre("m7", 45, 55, 185),
    Timbre("f4", 48, 45, 168),
    Timbre("m2", 30, 35, 172),
    Timbre("f5", 62, 65, 178),
    Timbre("m5", 52, 50, 160),
    Timbre("f2", 45, 50, 188),
    Timbre("m6", 42, 60, 178),
    Timbre("m4", 56, 45, 168),
)

_STYLE_NAMES: dict[str, str] = {
    **dict.fromkeys(("whisper", "whispers", "whispering", "whispered", "whisper softly"), "whisper"),
    **dict.fromkeys(("slow", "slowly", "slower", "slow down"), "slow"),
    **dict.fromkeys(("fast", "faster", "quick", "quickly", "speed up"), "fast"),
    **dict.fromkeys(("excited", "excitedly", "enthusiastic", "enthusiastically"), "excited"),
    **dict.fromkeys(("sad", "sadly", "sorrowful", "crying"), "sad"),
    **dict.fromkeys(("shouting", "shout", "shouts", "shouted", "yelling", "yell", "yells", "loud", "loudly"), "shouting"),
    **dict.fromkeys(("normal", "neutral", "normally"), "normal"),
}


@dataclass(frozen=True)
class Prosody:
    voice: str  # espeak-ng voice name, e.g. "en-us+f3"
    rate: int  # words per minute, 80..450
    pitch: int  # 0..100
    range: int  # 0..100
    volume: int  # 0..200 (100 = normal)


@dataclass(frozen=True)
class Segment:
    text: str
    prosody: Prosody


def _clamp(value: float, low: int, high: int) -> int:
    return max(low, min(high, round(value)))


def speaker_timbre(speaker: int) -> Timbre:
    """The built-in timbre of a speaker with no registered voice; speakers past the palette get shifted pitch."""
    base = TIMBRES[speaker % len(TIMBRES)]
    lap = speaker // len(TIMBRES)
    if lap == 0:
        return base
    shift = (7 * lap) % 31 - 15  # -15..15, varies per lap
    return base._replace(pitch=_clamp(base.pitch + shift, 10, 90), rate=_clamp(base.rate + 3 * (lap % 5), 120, 220))


def _voice_digest(voice_id: str) -> bytes:
    return hashlib.sha256(b"shoal/espeak/voice\x00" + voice_id.encode("utf-8")).digest()


def voice_timbres(voices: Mapping[int, VoiceRef]) -> dict[int, Timbre]:
    """Timbre per speaker that has a registered voice; equal ids share one, distinct ids differ when possible."""
    slots: dict[str, int] = {}
    for voice_id in sorted({ref.voice for ref in voices.values()}):
        slot = int.from_bytes(_voice_digest(voice_id)[:4], "big") % len(TIMBRES)
        if len(slots) < len(TIMBRES):
            taken = set(slots.values())
            while slot in taken:
                slot = (slot + 1) % len(TIMBRES)
        slots[voice_id] = slot
    out: dict[int, Timbre] = {}
    for speaker, ref in voices.items():
        digest = _voice_digest(ref.voice)
        base = TIMBRES[slots[ref.voice]]
        out[speaker] = base._replace(
            pitch=_clamp(base.pitch + digest[4] % 13 - 6, 0, 100),
            range=_clamp(base.range + digest[5] % 13 - 6, 0, 100),
            rate=_clamp(base.rate + digest[6] % 13 - 6, 80, 450),
        )
    return out


def style_of(instructions: Sequence[str]) -> str | None:
    """The delivery in force after these instructions: the last one we know, or None (unknown ones are ignored)."""
    for name in reversed(instructions):
        style = _STYLE_NAMES.get(name)
        if style is not None:
            return None if style == "normal" else style
    return None


def _prosody(language: str, timbre: Timbre, style: str | None) -> Prosody:
    variant = timbre.variant
    pitch, pitch_range, rate, volume = float(timbre.pitch), float(timbre.range), float(timbre.rate), 100
    if style == "whisper":
        variant = "whisperf" if variant.startswith("f") else "whisper"
    elif style == "slow":
        rate = rate * 0.7
    elif style == "fast":
        rate = rate * 1.35
    elif style == "excited":
        pitch, pitch_range, rate, volume = pitch + 15, pitch_range + 30, rate * 1.15, 115
    elif style == "sad":
        pitch, pitch_range, rate, volume = pitch - 12, pitch_range - 20, rate * 0.8, 85
    elif style == "shouting":
        pitch, pitch_range, volume = pitch + 12, pitch_range + 20, 180
    voice = f"{language}+{variant}" if variant else language
    return Prosody(voice, _clamp(rate, 80, 450), _clamp(pitch, 0, 100), _clamp(pitch_range, 0, 100), volume)


def plan_segments(request: SynthesisRequest, language: str) -> list[Segment]:
    """What espeak-ng must say, in order, each run of text with the prosody it is said with."""
    registered = voice_timbres(request.voices)
    segments: list[Segment] = []
    for piece in split_markup(request.text, request.speaker):
        timbre = registered.get(piece.speaker) or speaker_timbre(piece.speaker)
        prosody = _prosody(language, timbre, style_of(piece.instructions))
        if segments and segments[-1].prosody == prosody:
            segments[-1] = replace(segments[-1], text=f"{segments[-1].text} {piece.text}")
        else:
            segments.append(Segment(piece.text, prosody))
    return segments


def _word_runs(text: str) -> list[tuple[int, int, int | None]]:
    """(start, end, word index or None) of each whitespace-separated run of ``text``; words as ``words_of``."""
    runs: list[tuple[int, int, int | None]] = []
    count = 0
    for start, end, is_word in word_runs(text):
        runs.append((start, end, count if is_word else None))
        count += is_word
    return runs


def timing_from_events(segments: Sequence[Segment], events: Sequence[Sequence[object]], spoken: int,
                       complete: bool = True, ended: bool = True) -> Timing:
    """The request's word and phoneme timing from espeak-ng's events (``engine.espeak_process``'s ``ev`` lists).

    A word starts with its first phoneme (espeak-ng reports the word a little before its first sound) and ends at
    the next pause or the next word's first phoneme. A word espeak-ng did not report on its own (it reads "3.5" as
    three words but may fold a symbol into its neighbour) shares the span of the word before it. Only the words
    that start within the first ``spoken`` samples are listed: the rest were never heard (``ended`` False: the
    audio was cut short; ``complete`` False: the rest is not made yet).
    """
    offsets: list[int] = []  # first request-wide word index of each segment
    runs: list[list[tuple[int, int, int | None]]] = []
    total = 0
    for segment in segments:
        offsets.append(total)
        runs.append(_word_runs(segment.text))
        total += sum(1 for *_, word in runs[-1] if word is not None)
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    phonemes: list[PhonemeTiming] = []
    current: int | None = None  # the word the next phoneme belongs to
    sounding: int | None = None  # the word whose sound has started and not yet ended
    for kind, segment, position, sample, name in events:
        assert isinstance(segment, int) and isinstance(position, int) and isinstance(sample, int)
        if not 0 <= segment < len(segments):
            continue
        if kind == "w":
            current = _word_at(runs[segment], position - 1, offsets[segment])
        elif kind == "p":
            phonemes.append(PhonemeTiming(str(name), sample))
            if not name:  # a pause ends the sounding word
                if sounding is not None:
                    ends.setdefault(sounding, sample)
                sounding, current = None, None
            elif current is not None and current not in starts:
                if sounding is not None:
                    ends.setdefault(sounding, sample)
                starts[current] = sample
                sounding = current
        elif kind == "e" and sounding is not None:
            ends.setdefault(sounding, sample)
            sounding = None
    if sounding is not None:
        ends.setdefault(sounding, spoken)
    if not (complete and ended):  # words not reached are not unreported ones
        total = max(starts, default=-1) + 1
    return Timing(words=_fill(starts, ends, total, spoken), phonemes=tuple(p for p in phonemes if p.start < spoken),
                  complete=complete)


def _word_at(runs: list[tuple[int, int, int | None]], char: int, offset: int) -> int | None:
    for start, end, word in runs:
        if end > char:  # the run holding the character, or the first after it
            return None if word is None else offset + word
    return None


def _fill(starts: dict[int, int], ends: dict[int, int], total: int, spoken: int) -> tuple[WordTiming, ...]:
    """Words in order with start < end; a word without its own timing shares its predecessor's span (or the
    next word's, at the start); words that start at or after ``spoken`` are left out, and the list stops there."""
    out: list[tuple[int, int]] = []
    index = 0
    while index < total:
        start = starts.get(index)
        if start is None:  # a run of unreported words: share a neighbour's span
            run_end = index
            while run_end < total and run_end not in starts:
                run_end += 1
            if out:
                base_start, base_end = out.pop()
                group = run_end - index + 1
            elif run_end < total:
                base_start, base_end = starts[run_end], ends.get(run_end, starts[run_end] + 1)
                group = run_end - index + 1
                run_end += 1
            else:
                break  # nothing was reported at all
            width = max(1, base_end - base_start)
            for k in range(group):
                out.append((base_start + width * k // group, base_start + width * (k + 1) // group))
            index = run_end
            continue
        end = ends.get(index, start + 1)
        out.append((start, max(end, start + 1)))
        index += 1
    words: list[WordTiming] = []
    for i, (start, end) in enumerate(out):
        if start >= spoken:
            break
        if words and start < words[-1].end:  # shared spans split by integer steps never overlap; keep it so
            start = words[-1].end
        words.append(WordTiming(i, start, max(end, start + 1)))
    return tuple(words)
