"""The durable session record: a recipe from which any worker can rebuild the exact prompt.

Dataclasses with one msgpack serializer and a schema version. Codes are (10, frames) int16 arrays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

# "open": a stand-in for a turn still being spoken in one context when a later turn (another context) was stored;
# amended with the real record when it ends (left "open" only if the process died first)
TURN_STATES = ("complete", "cancelled", "length", "error", "open")


@dataclass
class Speaker:
    speaker: int
    voice: str | None = None


@dataclass
class Turn:
    index: int  # 0-based position in the conversation
    speaker: int
    text: str  # what was (or, when cut, what was heard of what was) sent for synthesis
    state: str  # one of TURN_STATES
    audio_ms: int  # audio duration kept for this turn (cut at played/sent ms when cancelled)
    codes: np.ndarray | None = None  # (10, frames) int16, when the engine has codes
    created_at: float = field(default_factory=time.time)
    context: str | None = None  # the concurrent context it was spoken in (None: the default one)
    started_at: float | None = None  # wall-clock time of its turn.started (turns of several contexts overlap)


@dataclass
class Voice:
    voice: str  # id
    text: str  # transcript
    seconds: float
    sample_rate: int
    audio: bytes  # the reference audio, as `audio_format` says
    codes: np.ndarray | None = None  # (10, frames) int16 for cloning engines; encoded once at registration
    created_at: float = field(default_factory=time.time)
    # "ogg-opus": an Ogg/Opus file (what the gateway stores: compact); "pcm16": PCM16 mono little-endian at
    # sample_rate (records written before voices were compressed)
    audio_format: str = "pcm16"


@dataclass
class Session:
    id: str
    speakers: list[Speaker] = field(default_factory=list)
    output: dict[str, Any] = field(default_factory=dict)  # the negotiated output settings (wire form)
    sampling: dict[str, Any] = field(default_factory=dict)  # sampling settings (wire form)
    turns: int = 0  # number of stored turns
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
