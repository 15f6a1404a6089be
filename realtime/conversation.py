"""The per-connection conversation logic, sans I/O: feed it client messages, read back events.

It owns the open turn (its text buffer, segmentation, speaker), turn numbering, cancel and playback
bookkeeping. It never awaits: the gateway pumps messages in and carries the events out (sending messages,
starting synthesis of segments, stopping turns). A turn is *open* while it accepts text; after ``turn.end`` it
is *closing* until the gateway reports it finished; ``cancel`` ends every active turn at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from realtime.protocol import (
    Cancel,
    Flush,
    Playback,
    ProtocolError,
    ServerMessage,
    Text,
    TurnEnd,
    TurnStarted,
)
from realtime.segmenter import DEFAULT_MAX_CHARS, Segmenter, last_speaker


@dataclass(frozen=True)
class Limits:
    turn_chars: int = 20_000  # text per turn
    buffered_chars: int = 64 * 1024  # text waiting to be segmented
    segment_chars: int = DEFAULT_MAX_CHARS  # length bound that forces a segment cut

    def __post_init__(self) -> None:
        if self.turn_chars < 1 or self.buffered_chars < 1:
            raise ValueError("limits must be positive")


# ---- events (conversation -> gateway)


@dataclass(frozen=True)
class Send:
    message: ServerMessage


@dataclass(frozen=True)
class SynthesizeSegment:
    turn: int
    index: int  # segment number within the turn
    text: str
    speaker: int  # speaker in effect at the start of the segment
    ready_at: float  # clock time the segment became ready (TTFA starts here)


@dataclass(frozen=True)
class EndTurn:
    """No more segments will come for this turn."""

    turn: int


@dataclass(frozen=True)
class CancelTurns:
    turns: tuple[int, ...]


@dataclass(frozen=True)
class PlaybackReported:
    turn: int
    played_ms: float


Event = Send | SynthesizeSegment | EndTurn | CancelTurns | PlaybackReported


@dataclass
class _OpenTurn:
    turn: int
    speaker: int  # the turn's speaker (turn.started)
    current_speaker: int  # speaker at the end of the text received so far
    segment_speaker: int  # speaker at the start of the next segment
    segmenter: Segmenter
    chars: int = 0
    segments: int = 0


@dataclass
class Conversation:
    next_turn: int  # index the next opened turn gets (= turns stored so far)
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.monotonic
    default_speaker: int = 0
    _open: _OpenTurn | None = None
    _closing: list[int] = field(default_factory=list)

    @property
    def open_turn(self) -> int | None:
        return self._open.turn if self._open else None

    @property
    def active_turns(self) -> tuple[int, ...]:
        """Turns whose audio may still be produced: closing ones, then the open one."""
        return tuple(self._closing) + ((self._open.turn,) if self._open else ())

    def receive(self, msg: Text | Flush | TurnEnd | Cancel | Playback) -> list[Event]:
        """Apply one turn-related client message. Raises ProtocolError for input it refuses."""
        if isinstance(msg, Text):
            return self._text(msg)
        if isinstance(msg, Flush):
            return self._cut_rest() if self._open else []
        if isinstance(msg, TurnEnd):
            if self._open is None:
                raise ProtocolError("bad_message", "turn.end without an open turn (send text first)")
            events = self._cut_rest()
            self._closing.append(self._open.turn)
            events.append(EndTurn(self._open.turn))
            self._open = None
            return events
        if isinstance(msg, Cancel):
            turns = self.active_turns
            self._open = None
            self._closing.clear()
            return [CancelTurns(turns)] if turns else []
        if isinstance(msg, Playback):
            if msg.turn >= self.next_turn:
                raise ProtocolError("bad_message", f"playback for turn {msg.turn}, which has not started")
            return [PlaybackReported(msg.turn, msg.played_ms)]
        raise TypeError(f"not a turn message: {msg!r}")  # pragma: no cover - the gateway routes by type

    def finished(self, turn: int) -> None:
        """The gateway is done with ``turn`` (all audio sent, or stopped)."""
        if turn in self._closing:
            self._closing.remove(turn)
        if self._open is not None and self._open.turn == turn:
            self._open = None

    # ---- internals

    def _text(self, msg: Text) -> list[Event]:
        events: list[Event] = []
        turn = self._open
        if turn is None:
            speaker = msg.speaker if msg.speaker is not None else self.default_speaker
            turn = self._open = _OpenTurn(
                turn=self.next_turn,
                speaker=speaker,
                current_speaker=speaker,
                segment_speaker=speaker,
                segmenter=Segmenter(self.limits.segment_chars),
            )
            self.next_turn += 1
            events.append(Send(TurnStarted(turn=turn.turn, speaker=speaker)))
        text = msg.text
        if msg.speaker is not None and msg.speaker != turn.current_speaker:
            # a speaker change inside a turn becomes an inline tag, as the model's prompt format has it
            text = f"<|speaker:{msg.speaker}|>{text}"
        if turn.chars + len(text) > self.limits.turn_chars:
            raise ProtocolError("limit", f"a turn holds at most {self.limits.turn_chars} characters of text")
        if turn.segmenter.buffered + len(text) > self.limits.buffered_chars:
            raise ProtocolError("limit", f"at most {self.limits.buffered_chars} characters may wait unsegmented")
        if msg.speaker is not None:
            self.default_speaker = msg.speaker
        turn.chars += len(text)
        turn.current_speaker = last_speaker(text, turn.current_speaker)
        for segment in turn.segmenter.feed(text):
            events.append(self._segment(turn, segment))
        return events

    def _cut_rest(self) -> list[Event]:
        assert self._open is not None
        rest = self._open.segmenter.flush()
        return [self._segment(self._open, rest)] if rest else []

    def _segment(self, turn: _OpenTurn, text: str) -> SynthesizeSegment:
        event = SynthesizeSegment(
            turn=turn.turn, index=turn.segments, text=text, speaker=turn.segment_speaker, ready_at=self.clock()
        )
        turn.segments += 1
        turn.segment_speaker = last_speaker(text, turn.segment_speaker)
        return event
