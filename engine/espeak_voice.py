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

from engine.base import SynthesisRequest, VoiceRef
from engine.markup import split_markup

__all__ = ["TIMBRES", "Prosody", "Segment", "Timbre", "plan_segments", "speaker_timbre", "style_of", "voice_timbres"]


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

    def to_wire(self) -> dict[str, object]:
        p = self.prosody
        return {"text": self.text, "voice": p.voice, "rate": p.rate, "pitch": p.pitch, "range": p.range,
                "volume": p.volume}


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
