"""The turn lifecycle of one session, sans I/O: the one place that knows what every turn is, has sent, was heard
and has stored.

Feed it inputs, act on what it returns; it never awaits and never touches a socket, an engine or Redis, so a test
drives it with plain calls (the way the websockets library's protocol core is driven)::

    client messages   receive(Text | Flush | TurnEnd | Cancel | Playback)  -> [Send | Stream | Stop]
    synthesis         next_job() -> Synthesize | Finish | None;  segment_audio() / packet() / segment_finished()
                      / audio_finished()
    the socket        packet_sent(turn, now), done_sent(turn, now) -> the final ``turn.done``
    the store         next_write() -> Write | None;  write_ok(write);  write_failed(write, error) -> [Send]
    the clock         tick(now) -> []  (settles turns nobody can hear any more)
    the end           close(now)  (finishes every live turn as cut where the socket stopped)

A turn is identified by its index in the session (``Turn.index`` in the store): unique for the life of the
session, whatever context it belongs to. ``context`` names the stream of turns it belongs to (one open turn per
context; the default context is ``""``), so several contexts in flight at once need no new identity.

States (``TurnState``)::

    OPEN ──turn.end──► ENDING ──last audio made──► FINISHING ──turn.done sent──► DONE ──30 s / later turn heard──► SETTLED
      └──────────── cancel / close ─────────────────┘  (turn.done "cancelled" at once)

While a turn is DONE its listener may still be hearing it (audio goes out up to ``lead_ms`` ahead of the ear), so a
``playback`` report still cuts it. What is stored for a turn (``Turn``): the words whose audio started before the
cut, the codes of the frames that started before it, ``audio_ms`` = the cut. The cut is where the listener stopped
(``playback.played_ms``), else what the socket sent; it only ever shrinks. A segment with word timing
(``segment_timing``: reported by the engine, or estimated by an aligner) keeps exactly the words whose ``start_ms``
lies before the cut; one without keeps the words whose first character lies before the cut's share of its text.

Word timing goes out (``output.timestamps``) as ``words`` and ``visemes`` messages, one each per segment, after its
``segment`` message and before its first audio packet. Their times are the segment's engine samples counted from
the turn's first sample, so they sit on the clock of ``audio.ms``.

Stored turns are contiguous, in the order they started: turn i is appended only after turn i-1; an amendment (a
later, shorter cut) replaces a stored record. With concurrent contexts, a turn that ends while an earlier one (another
context) is still being spoken does not wait for it: the earlier one's place is held by a stand-in record (state
``open``, no text) that its real record amends when it ends. Turns not yet stored are bounded (``max_unstored``): past that, a new turn is refused with
``limit`` until the store takes them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from engine.base import PastTurn, Timing
from engine.markup import plain_text, spoken_words
from engine.visemes import viseme_of
from realtime.protocol import (
    Audio,
    Cancel,
    Error,
    Flush,
    Playback,
    ProtocolError,
    Segment,
    ServerMessage,
    Text,
    TurnDone,
    TurnEnd,
    TurnStarted,
    Visemes,
    Words,
)
from realtime.segmenter import DEFAULT_MAX_CHARS, Segmenter, last_speaker
from sessions.model import Turn

__all__ = [
    "Finish",
    "Limits",
    "Send",
    "Stop",
    "Stream",
    "Synthesize",
    "TurnMachine",
    "TurnState",
    "Write",
    "cut_text",
]


@dataclass(frozen=True)
class Limits:
    turn_chars: int = 20_000  # text per turn
    buffered_chars: int = 64 * 1024  # text waiting to be segmented
    segment_chars: int = DEFAULT_MAX_CHARS  # length bound that forces a segment cut
    audible_s: float = 30.0  # a playback report is honoured this long after turn.done went out
    audible_turns: int = 8  # ... and for at most this many finished turns
    max_unstored: int = 64  # finished turns waiting for the store before new turns are refused
    max_contexts: int = 8  # contexts with a turn in flight at once
    # stored turns kept in memory as the engine's context (newest first); older ones live only in the store, so a
    # long conversation costs a bounded amount of memory (S2 Pro's 4096-token window holds fewer turns than this)
    context_turns: int = 128

    def __post_init__(self) -> None:
        if (self.turn_chars < 1 or self.buffered_chars < 1 or self.max_unstored < 1 or self.audible_turns < 1
                or self.max_contexts < 1):
            raise ValueError("limits must be positive")
        if self.context_turns < self.audible_turns:
            raise ValueError("context_turns must be at least audible_turns (a turn that can still be cut is kept)")
        if self.audible_s <= 0:
            raise ValueError("audible_s must be positive")


class TurnState(Enum):
    OPEN = "open"  # accepts text; its segments are synthesized as they are cut
    ENDING = "ending"  # turn.end received: no more text, the rest of its audio is being made
    FINISHING = "finishing"  # all audio made; turn.done is queued behind it
    DONE = "done"  # turn.done sent; the listener may still be hearing it
    SETTLED = "settled"  # nothing can change it any more


LIVE = (TurnState.OPEN, TurnState.ENDING)
IN_FLIGHT = (*LIVE, TurnState.FINISHING)  # not yet turn.done

# ---- outputs


@dataclass(frozen=True)
class Send:
    """Send now (the control lane: jumps ahead of audio)."""

    message: ServerMessage


@dataclass(frozen=True)
class Stream:
    """Send in order behind the turn's audio (``turn.done``: its numbers are final only when it is sent)."""

    message: ServerMessage


@dataclass(frozen=True)
class Stop:
    """Barge-in: stop making and sending audio of these turns now (engine step, queued packets, encoder)."""

    turns: tuple[int, ...]


Output = Send | Stream | Stop


@dataclass(frozen=True)
class Synthesize:
    turn: int
    segment: int  # index within the turn
    text: str
    speaker: int  # speaker in effect at the start of the segment
    ready_at: float  # when the segment was cut (TTFA starts here)
    max_samples: int | None  # engine samples the turn may still produce (max_frames), None: no bound


@dataclass(frozen=True)
class Finish:
    """Every segment of ``turn`` is made: flush the encoder, then call ``audio_finished``."""

    turn: int


Job = Synthesize | Finish


@dataclass(frozen=True)
class Write:
    op: str  # "append" | "amend"
    turn: Turn


# ---- state


@dataclass
class _Segment:
    index: int
    text: str
    speaker: int
    ready_at: float
    start_ms: float | None = None  # position of its first audio within the turn (output timeline)
    start_sample: int = 0  # engine samples of the turn before it (set with start_ms)
    heard_at: list[tuple[float, int]] | None = None  # word timing: (start_ms, end in .text) of each word heard
    timed: bool = False  # its complete timing is known (and its words / visemes messages were made)
    samples: int = 0  # engine samples kept
    codes: list[np.ndarray] = field(default_factory=list)  # (10, k) int16 chunks
    finished: bool = False


@dataclass
class _Turn:
    index: int
    speaker: int  # the turn's speaker (turn.started)
    context: str
    frame_ms: float  # output packet duration, fixed for the turn
    started_at: float  # wall clock, for the record
    segmenter: Segmenter
    current_speaker: int  # speaker at the end of the text received so far
    segment_speaker: int  # speaker at the start of the next segment
    state: TurnState = TurnState.OPEN
    reason: str | None = None  # complete | cancelled | length | error, once known
    chars: int = 0
    segments: list[_Segment] = field(default_factory=list)
    next_segment: int = 0  # first segment not yet handed to synthesis
    samples: int = 0  # engine samples kept, all segments
    made: int = 0  # packets made (enqueued)
    delivered: int = 0  # packets handed to the socket
    ready_at: float | None = None
    first_sent_at: float | None = None
    heard_ms: float | None = None  # the listener's last reported position
    done_queued: bool = False  # turn.done is in the stream lane
    stand_in: bool = False  # a later turn (another context) ended first: an "open" record holds this one's place
    done_at: float | None = None
    record: Turn | None = None  # what the conversation remembers (set when turn.done goes out, or at close)

    @property
    def ttfa_ms(self) -> float | None:
        if self.ready_at is None or self.first_sent_at is None:
            return None
        return round((self.first_sent_at - self.ready_at) * 1000.0, 3)


class TurnMachine:
    """All turns of one connection's session. See the module docstring for the inputs and outputs."""

    def __init__(
        self,
        history: list[Turn],
        *,
        sample_rate: int,
        frame_ms: float | None,
        output_frame_ms: float,
        max_frames: int,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        # the conversation as remembered: stored turns, then those waiting for the store; a stored turn older than
        # the last ``context_turns`` is None here (it is in the store, and no longer in any engine's context)
        self.history: list[Turn | None] = list(history)
        self.limits = limits or Limits()
        self.clock = clock
        self.wall = wall
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms  # engine frame (codes), None for engines without frames
        self.output_frame_ms = output_frame_ms
        self.max_frames = max_frames
        self.stored = len(history)  # turns the store holds (history[:stored])
        self._amends: dict[int, Turn] = {}  # stored turns to replace, by index
        self._turns: dict[int, _Turn] = {}  # live and still audible turns, by index
        self._open: dict[str, int] = {}  # context -> its open turn
        self._muted: set[str] = set()  # contexts whose open turn the caller's voice cut: their text waits for turn.end
        self._next = len(history)  # index of the next turn
        self._early: dict[int, Turn] = {}  # remembered turns that finished before an earlier one (other context)
        self._store_down = False
        self._forgotten = 0  # history[:_forgotten] is None
        self._forget()  # a resumed long conversation: only its recent turns in memory
        self.default_speaker = 0
        self.timestamps = "none"  # output.timestamps: which timing messages go out (none | words | visemes)

    # ------------------------------------------------------------------ views

    @property
    def next_turn(self) -> int:
        return self._next

    @property
    def active_turns(self) -> tuple[int, ...]:
        """Turns whose audio is still being made or sent (not yet turn.done)."""
        return tuple(i for i, t in self._turns.items() if t.state in IN_FLIGHT)

    @property
    def unstored(self) -> int:
        """Finished turns the store does not have yet (remembered, or with their turn.done on its way)."""
        finishing = sum(1 for t in self._turns.values() if t.done_queued and t.record is None)
        return len(self.history) - self.stored + len(self._amends) + len(self._early) + finishing

    @property
    def contexts(self) -> set[str]:
        """Contexts with a turn in flight (not yet turn.done)."""
        return {t.context for t in self._turns.values() if t.state in IN_FLIGHT}

    def state(self, turn: int) -> TurnState | None:
        t = self._turns.get(turn)
        if t is not None:
            return t.state
        return TurnState.SETTLED if turn < len(self.history) else None

    def live(self, turn: int) -> bool:
        """May audio of ``turn`` still go out? (False once cancelled.)"""
        t = self._turns.get(turn)
        return t is not None and t.reason != "cancelled" and t.state in IN_FLIGHT

    def audible_turns(self) -> list[int]:
        """Turns the listener may still be hearing: in flight, or done (turn.done sent) but not yet settled; a
        cancelled one is silent already."""
        return [i for i, t in self._turns.items()
                if (t.state in IN_FLIGHT or t.state is TurnState.DONE) and t.reason != "cancelled"]

    def sent_ms(self, turn: int) -> float:
        """Audio of ``turn`` handed to the socket so far."""
        t = self._turns.get(turn)
        return 0.0 if t is None else t.delivered * t.frame_ms

    def context_of(self, turn: int) -> str:
        t = self._turns.get(turn)
        return "" if t is None else t.context

    def wants_audio(self, turn: int) -> bool:
        """Should synthesis of ``turn`` go on? (False once it was stopped, failed or reached max_frames.)"""
        t = self._turns.get(turn)
        return t is not None and t.reason is None and t.state in IN_FLIGHT

    def configure(self, *, output_frame_ms: float, max_frames: int, timestamps: str = "none") -> None:
        """New output / sampling settings (between turns: the gateway refuses session.update during one)."""
        self.output_frame_ms, self.max_frames, self.timestamps = output_frame_ms, max_frames, timestamps

    # ------------------------------------------------------------------ client messages

    def receive(self, msg: Text | Flush | TurnEnd | Cancel | Playback) -> list[Output]:
        """Apply one turn message. Raises ProtocolError for input it refuses (the session stays usable)."""
        if isinstance(msg, Text):
            if (msg.context or "") in self._muted:
                return []  # the rest of a reply the caller interrupted
            return self._text(msg, msg.context or "")
        context = msg.context or ""
        if context in self._muted and isinstance(msg, (Flush, TurnEnd)):
            if isinstance(msg, TurnEnd):
                self._muted.discard(context)  # the interrupted reply is over: the next text opens a new turn
            return []
        if isinstance(msg, Flush):
            turn = self._open_turn(context)
            if turn is not None:
                self._cut(turn, turn.segmenter.flush())
            return []
        if isinstance(msg, TurnEnd):
            turn = self._open_turn(context)
            if turn is None:
                raise ProtocolError("bad_message", "turn.end without an open turn (send text first)")
            self._cut(turn, turn.segmenter.flush())
            turn.state = TurnState.ENDING
            del self._open[context]
            return []
        if isinstance(msg, Cancel):
            return self.cancel(msg.context)  # without a context: every context
        if isinstance(msg, Playback):
            return self._playback(msg)
        raise TypeError(f"not a turn message: {msg!r}")  # pragma: no cover - the gateway routes by type

    def barge_in(self) -> list[Output]:
        """The caller spoke over the session: every live turn ends now as ``cancelled`` (as ``cancel`` does), and the
        text still arriving for a turn that was open (the rest of an LLM's reply, sent before the client heard of
        it) is dropped until that turn's ``turn.end``, instead of opening a new turn."""
        interrupted = set(self._open)
        out = self.cancel(None)
        self._muted |= interrupted
        return out

    def cancel(self, context: str | None = None) -> list[Output]:
        """Barge-in on ``context`` (None: every context): its live turns end now as ``cancelled``."""
        self._muted = set() if context is None else self._muted - {context}  # the client knows: its text is new
        turns = [t for t in self._turns.values() if t.state in IN_FLIGHT and not t.done_queued]
        turns = [t for t in turns if context is None or t.context == context]
        if not turns:
            return []
        out: list[Output] = [Stop(tuple(t.index for t in turns))]
        for t in turns:
            self._open.pop(t.context, None)
            t.reason = "cancelled"
            t.state = TurnState.FINISHING  # a report that came before the cancel applies now
            t.done_queued = True
            out.append(Stream(self._turn_done(t)))
        return out

    def _text(self, msg: Text, context: str) -> list[Output]:
        out: list[Output] = []
        turn = self._open_turn(context)
        if turn is None:
            if self.unstored >= self.limits.max_unstored:
                raise ProtocolError(
                    "limit",
                    f"{self.unstored} finished turns wait to be stored (the session store is slow or unavailable); "
                    "new turns are refused until it takes them",
                )
            if context not in self.contexts and len(self.contexts) >= self.limits.max_contexts:
                raise ProtocolError(
                    "limit", f"at most {self.limits.max_contexts} contexts may have a turn in flight at once"
                )
            speaker = msg.speaker if msg.speaker is not None else self.default_speaker
            index = self._next
            self._next += 1
            turn = _Turn(
                index=index,
                speaker=speaker,
                context=context,
                frame_ms=self.output_frame_ms,
                started_at=self.wall(),
                segmenter=Segmenter(self.limits.segment_chars),
                current_speaker=speaker,
                segment_speaker=speaker,
            )
            self._turns[index] = turn
            self._open[context] = index
            out.append(Send(TurnStarted(turn=index, speaker=speaker, context=context or None)))
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
            self._cut(turn, segment)
        return out

    def _open_turn(self, context: str) -> _Turn | None:
        index = self._open.get(context)
        return None if index is None else self._turns[index]

    def _cut(self, turn: _Turn, text: str | None) -> None:
        if not text:
            return
        turn.segments.append(_Segment(len(turn.segments), text, turn.segment_speaker, self.clock()))
        turn.segment_speaker = last_speaker(text, turn.segment_speaker)

    def _playback(self, msg: Playback) -> list[Output]:
        if msg.turn >= self.next_turn:
            raise ProtocolError("bad_message", f"playback for turn {msg.turn}, which has not started")
        turn = self._turns.get(msg.turn)
        if turn is None or turn.state is TurnState.SETTLED:
            raise ProtocolError(
                "limit",
                f"playback for turn {msg.turn} came too late: a turn can be cut for {self.limits.audible_s:g} s "
                f"after its turn.done (and for the last {self.limits.audible_turns} turns); the report was ignored",
            )
        turn.heard_ms = msg.played_ms  # the latest report is where the listener is (a stored cut never grows)
        for earlier in self._turns.values():  # the listener is past every earlier turn of that context
            if earlier.index < turn.index and earlier.context == turn.context and earlier.state is TurnState.DONE:
                self._settle(earlier)
        if turn.state is TurnState.DONE:
            self._recut(turn)
        return []

    # ------------------------------------------------------------------ synthesis

    def next_job(self, context: str | None = None) -> Job | None:
        """The next piece of work for the synthesis of ``context`` (None: of any context). Within a context one
        turn at a time, in order; contexts run side by side, each with a synthesis task of its own."""
        for ctx in ([context] if context is not None else self.job_contexts()):
            turn = self._first_live(ctx)
            if turn is None:
                continue
            if turn.reason is None and turn.next_segment < len(turn.segments):
                seg = turn.segments[turn.next_segment]
                turn.next_segment += 1
                if turn.ready_at is None:
                    turn.ready_at = seg.ready_at
                return Synthesize(turn.index, seg.index, seg.text, seg.speaker, seg.ready_at, self._samples_left(turn))
            if self._may_finish(turn):
                turn.state = TurnState.FINISHING
                return Finish(turn.index)
        return None

    def job_contexts(self) -> list[str]:
        """Contexts that have a job waiting."""
        out: list[str] = []
        for turn in self._turns.values():
            if turn.state not in LIVE or turn.context in out or self._first_live(turn.context) is not turn:
                continue
            if (turn.reason is None and turn.next_segment < len(turn.segments)) or self._may_finish(turn):
                out.append(turn.context)
        return out

    def _first_live(self, context: str) -> _Turn | None:
        for turn in self._turns.values():
            if turn.state in LIVE and turn.context == context:
                return turn
        return None

    @staticmethod
    def _may_finish(turn: _Turn) -> bool:
        """All its segments are made (or it stopped early): time to flush the encoder and send turn.done."""
        if turn.state is not TurnState.ENDING or not all(s.finished for s in turn.segments[: turn.next_segment]):
            return False
        return turn.reason is not None or turn.next_segment == len(turn.segments)

    def _samples_left(self, turn: _Turn) -> int | None:
        if self.frame_ms is None:
            return None  # max_frames bounds frame-based engines only
        per_frame = round(self.frame_ms * self.sample_rate / 1000.0)
        return max(0, self.max_frames * per_frame - turn.samples)

    def segment_audio(self, turn: int, segment: int, samples: int, codes: np.ndarray | None) -> tuple[int, Segment | None]:
        """Engine audio of a segment arrived: how many of its samples to keep (fewer at ``max_frames``), and the
        ``segment`` message to send before its first packet (None after the first chunk)."""
        t = self._turns[turn]
        seg = t.segments[segment]
        announce = self._begin(t, seg)
        left = self._samples_left(t)
        keep = samples if left is None else min(samples, left)
        if codes is not None and self.frame_ms is not None:
            per_frame = round(self.frame_ms * self.sample_rate / 1000.0)
            frames = min(codes.shape[1], math.ceil(keep / per_frame)) if keep < samples else codes.shape[1]
            if frames:
                seg.codes.append(np.asarray(codes[:, :frames], dtype=np.int16))
        elif codes is not None:
            seg.codes.append(np.asarray(codes, dtype=np.int16))
        seg.samples += keep
        t.samples += keep
        if left is not None and keep >= left and t.reason is None:
            t.reason = "length"  # the turn's frame budget is spent: no more segments
        return keep, announce

    @staticmethod
    def _begin(t: _Turn, seg: _Segment) -> Segment | None:
        """Place the segment on the turn's timeline at its first audio (or timing): its ``segment`` message, once."""
        if seg.start_ms is not None:
            return None
        seg.start_ms = t.made * t.frame_ms
        seg.start_sample = t.samples
        return Segment(turn=t.index, text=plain_text(seg.text), ms=round(seg.start_ms, 3), context=t.context or None,
                       speaker=seg.speaker, markup=seg.text)

    def segment_timing(self, turn: int, segment: int, timing: Timing) -> list[ServerMessage]:
        """When the segment's words are heard (engine sample positions from the segment's start): remembered for
        the cut (each report replaces the last), and the messages to queue before its first packet — ``segment``
        if not yet sent, then, once the timing is complete, ``words`` and ``visemes`` as ``output.timestamps``
        asks. With timestamps the gateway holds the segment's audio until then; without, timing may come after
        the audio. Words past the turn's frame budget are never heard and are left out."""
        t = self._turns.get(turn)
        if t is None or not self.live(turn):
            return []
        seg = t.segments[segment]
        out: list[ServerMessage] = []
        announce = self._begin(t, seg)
        if announce is not None:
            out.append(announce)
        left = self._samples_left(t)
        limit = math.inf if left is None else seg.samples + left  # samples of this segment that may be heard
        ms = lambda sample: round((seg.start_sample + min(sample, limit)) * 1000.0 / self.sample_rate, 1)  # noqa: E731
        written = spoken_words(seg.text)
        heard: list[tuple[float, int]] = []
        words: list[dict[str, object]] = []
        for w in timing.words:
            if w.word >= len(written) or w.start >= limit:
                break
            heard.append((ms(w.start), written[w.word].end))
            words.append({"text": written[w.word].text, "start_ms": ms(w.start), "end_ms": ms(w.end)})
        seg.heard_at = heard
        if self.timestamps == "none" or not timing.complete or seg.timed:
            return out
        seg.timed = True
        context = t.context or None
        out.append(Words(turn=turn, words=tuple(words), estimated=timing.estimated, context=context))
        if self.timestamps == "visemes":
            visemes: list[dict[str, object]] = []
            for p in timing.phonemes:
                if p.start >= limit:
                    break
                shape = viseme_of(p.phoneme)
                if not visemes or visemes[-1]["id"] != shape:
                    visemes.append({"id": shape, "start_ms": ms(p.start)})
            out.append(Visemes(turn=turn, visemes=tuple(visemes), context=context))
        return out

    def packet(self, turn: int, data: bytes) -> Audio | None:
        """An encoded packet of ``turn`` is ready to queue: its ``audio`` message, or None if the turn was stopped."""
        if not self.live(turn):
            return None
        t = self._turns[turn]
        msg = Audio(turn=turn, seq=t.made, ms=round(t.made * t.frame_ms, 3), data=data, context=t.context or None)
        t.made += 1
        return msg

    def segment_finished(self, turn: int, segment: int, error: str | None = None) -> list[Output]:
        """The engine is done with a segment (``error``: it failed; the turn ends as ``error``)."""
        t = self._turns.get(turn)
        if t is None:
            return []
        t.segments[segment].finished = True
        if error is None or t.reason is not None:
            return []
        t.reason = "error"
        return [Send(Error("engine_unavailable", f"turn {turn}: {error}"))]

    def audio_finished(self, turn: int) -> list[Output]:
        """The ``Finish`` job is done (the encoder flushed): ``turn.done`` goes out behind the last packet."""
        t = self._turns.get(turn)
        if t is None or t.state is not TurnState.FINISHING or t.reason == "cancelled":
            return []
        t.reason = t.reason or "complete"
        t.done_queued = True
        return [Stream(self._turn_done(t))]

    def _turn_done(self, t: _Turn) -> TurnDone:
        return TurnDone(turn=t.index, reason=t.reason or "complete", audio_ms=0.0, frames=0, ttfa_ms=None,
                        context=t.context or None)

    # ------------------------------------------------------------------ the socket

    def packet_sent(self, turn: int, now: float) -> float | None:
        """A packet of ``turn`` was handed to the socket. Returns the turn's TTFA (ms) at its first packet."""
        t = self._turns.get(turn)
        if t is None:
            return None
        t.delivered += 1
        if t.first_sent_at is None:
            t.first_sent_at = now
            return t.ttfa_ms
        return None

    def done_sent(self, turn: int, now: float) -> TurnDone | None:
        """``turn.done`` is being sent: its final numbers (what was really sent). The turn is now remembered."""
        t = self._turns.get(turn)
        if t is None or t.state is not TurnState.FINISHING:
            return None
        self._remember(t, now)
        return TurnDone(
            turn=turn,
            reason=t.reason or "complete",
            audio_ms=round(t.delivered * t.frame_ms, 3),
            frames=t.delivered,
            ttfa_ms=t.ttfa_ms,
            context=t.context or None,
        )

    def caller_turn(self, speaker: int, text: str, audio_ms: float, codes: np.ndarray | None) -> int:
        """What the caller said (``input.commit``), as a finished turn of ``speaker`` with its audio's codes: stored
        in order with the others, and in the context of every later turn. Returns its index."""
        if self.unstored >= self.limits.max_unstored:
            raise ProtocolError("limit", f"{self.unstored} finished turns wait to be stored; input.commit refused")
        index = self._next
        self._next += 1
        now = self.clock()
        t = _Turn(index=index, speaker=speaker, context="input", frame_ms=self.output_frame_ms, started_at=self.wall(),
                  segmenter=Segmenter(self.limits.segment_chars), current_speaker=speaker, segment_speaker=speaker,
                  state=TurnState.FINISHING, reason="complete", done_queued=True)
        self._turns[index] = t
        self._remember(t, now, Turn(index=index, speaker=speaker, text=text, state="complete",
                                    audio_ms=int(round(audio_ms)), codes=codes, context="input",
                                    started_at=t.started_at))
        self._settle(t)
        self._prune()
        return index

    def _remember(self, t: _Turn, now: float, record: Turn | None = None) -> None:
        if t.reason != "cancelled":
            t.heard_ms = None  # reports while it played were progress; only a cancel or a later report cuts it
        t.state = TurnState.DONE
        t.done_at = now
        t.record = record or self._record(t)
        if t.stand_in:  # a stand-in holds its place: the real record replaces it (an amendment once stored)
            self._replace(t.index, t.record)
        else:
            self._early[t.index] = t.record
            for other in self._turns.values():  # earlier turns still in flight in other contexts: hold their places
                if other.index < t.index and other.record is None and not other.stand_in:
                    other.stand_in = True
                    self._early[other.index] = Turn(index=other.index, speaker=other.speaker, text="", state="open",
                                                    audio_ms=0, context=other.context or None,
                                                    started_at=other.started_at)
        while len(self.history) in self._early:  # in start order, without waiting for a turn still being spoken
            self.history.append(self._early.pop(len(self.history)))
        self._prune()

    def _replace(self, index: int, record: Turn) -> None:
        if index in self._early:
            self._early[index] = record
            return
        self.history[index] = record
        if index < self.stored:
            self._amends[index] = record

    # ------------------------------------------------------------------ truncation

    def _kept_ms(self, t: _Turn) -> float:
        sent = t.delivered * t.frame_ms
        return sent if t.heard_ms is None else min(sent, t.heard_ms)

    def _record(self, t: _Turn) -> Turn:
        """The turn as the conversation remembers it: cut where the listener stopped, else where sending stopped."""
        kept = self._kept_ms(t)
        total = t.made * t.frame_ms
        parts: list[str] = []
        started = [s for s in t.segments if s.start_ms is not None]
        for i, seg in enumerate(started):
            assert seg.start_ms is not None
            if seg.start_ms >= kept:
                break
            end = started[i + 1].start_ms if i + 1 < len(started) else total
            assert end is not None
            if seg.heard_at:  # word timing: exactly the words that had started
                heard = [stop for start, stop in seg.heard_at if start < kept]
                whole = len(heard) == len(spoken_words(seg.text))
                text = seg.text if whole else seg.text[: heard[-1]].rstrip() if heard else ""
            else:
                share = 1.0 if end <= seg.start_ms or kept >= end else (kept - seg.start_ms) / (end - seg.start_ms)
                text = cut_text(seg.text, share)
            if text:
                parts.append(text)
        chunks = [c for s in started for c in s.codes]
        codes = np.concatenate(chunks, axis=1) if chunks else None
        if codes is not None and self.frame_ms is not None and kept < total:
            codes = codes[:, : math.ceil(kept / self.frame_ms - 1e-9)]  # the frames that started before the cut
        return Turn(
            index=t.index,
            speaker=t.speaker,
            text=" ".join(parts),
            state=t.reason or "complete",
            audio_ms=int(round(kept)),
            codes=codes,
            context=t.context or None,
            started_at=t.started_at,
        )

    def _recut(self, t: _Turn) -> None:
        """A report after turn.done: cut the remembered turn shorter (never longer) and store the amendment."""
        assert t.record is not None
        new = self._record(t)
        if new.audio_ms >= t.record.audio_ms:
            return
        new = replace(new, created_at=t.record.created_at)
        t.record = new
        self._replace(t.index, new)

    def _settle(self, t: _Turn) -> None:
        t.state = TurnState.SETTLED

    def _prune(self) -> None:
        """Keep the per-connection state bounded: settle old audible turns, forget settled ones."""
        done = [t for t in self._turns.values() if t.state is TurnState.DONE]
        for t in done[: max(0, len(done) - self.limits.audible_turns)]:
            self._settle(t)
        for index in [i for i, t in self._turns.items() if t.state is TurnState.SETTLED]:
            del self._turns[index]

    def tick(self, now: float) -> list[Output]:
        """Time passes: turns done more than ``audible_s`` ago can no longer be heard."""
        for t in self._turns.values():
            if t.state is TurnState.DONE and t.done_at is not None and now - t.done_at > self.limits.audible_s:
                self._settle(t)
        self._prune()
        return []

    # ------------------------------------------------------------------ the store

    def next_write(self) -> Write | None:
        """The next record to store: appends in index order first, then amendments."""
        if self.stored < len(self.history):
            return Write("append", self.history[self.stored])
        if self._amends:
            index = min(self._amends)
            return Write("amend", self._amends[index])
        return None

    def write_ok(self, write: Write) -> None:
        """The store took ``write``. (Retry a failed write as it was: the store recognises one that did happen.)"""
        i = write.turn.index
        if write.op == "append" and i == self.stored:
            self.stored += 1
            self._forget()
            if self.history[i] is not write.turn:  # cut again while it was being appended
                self._amends[i] = self.history[i]
        elif write.op == "amend" and self._amends.get(i) is write.turn:
            del self._amends[i]
        self._store_down = False

    def _forget(self) -> None:
        """Drop stored turns older than the last ``context_turns`` from memory (the store keeps them)."""
        while self._forgotten < self.stored - self.limits.context_turns:
            self.history[self._forgotten] = None
            self._forgotten += 1

    def write_failed(self, write: Write, error: str) -> list[Output]:
        """A write failed (the store is down or timed out); it will be retried. The client is told once per outage."""
        if self._store_down:
            return []
        self._store_down = True
        return [
            Send(
                Error(
                    "internal",
                    f"session store unavailable ({error}); turn {write.turn.index} and later ones are kept and "
                    "will be stored when it returns",
                )
            )
        ]

    def has_write(self) -> bool:
        return self.stored < len(self.history) or bool(self._amends)

    # ------------------------------------------------------------------ the end

    def close(self, now: float) -> list[tuple[int, str]]:
        """The connection is ending: every turn not yet remembered is finished as sent (cancelled if it was still
        being made, or not all of it went out). Returns those turns, with their reason."""
        ended: list[tuple[int, str]] = []
        for t in sorted(self._turns.values(), key=lambda t: t.index):
            if t.record is not None:
                continue
            if t.state in LIVE or t.reason is None or t.delivered < t.made:
                t.reason = "cancelled"  # the listener did not get all of it
            t.state = TurnState.FINISHING
            self._remember(t, now)
            ended.append((t.index, t.reason or "complete"))
        self._open.clear()
        for t in self._turns.values():
            self._settle(t)
        self._prune()
        return ended

    # ------------------------------------------------------------------ engine context

    def past(self, turn: int) -> list[PastTurn]:
        """What the engine hears before ``turn``'s next segment: the remembered turns (cut where they were
        heard), then the earlier segments of this turn with their audio, so prosody runs on.

        With concurrent contexts this is a deliberate layout: the remembered turns come one after the other in the
        order they *started*, whole (the model has no notion of two voices at once, and the store keeps them in the
        same order), and a turn still in flight in another context is not in it: lines spoken over each other do
        not hear each other, and the next turn after them hears both."""
        past = [PastTurn(t.speaker, t.text, t.codes) for t in self.history if t is not None and t.text]
        t = self._turns.get(turn)
        if t is not None:
            for seg in t.segments:
                if seg.finished and seg.start_ms is not None:
                    codes = np.concatenate(seg.codes, axis=1) if seg.codes else None
                    past.append(PastTurn(seg.speaker, seg.text, codes))
        return past


_WORD = re.compile(r"\S+")


def cut_text(text: str, share: float) -> str:
    """The words of ``text`` whose first character lies before ``share`` (0..1) of it: the words that had started
    when the listener stopped, by character position (tags and instructions count as characters too)."""
    if share >= 1.0:
        return text
    limit = share * len(text)
    end = 0
    for m in _WORD.finditer(text):
        if m.start() >= limit:
            break
        end = m.end()
    return text[:end].rstrip()

