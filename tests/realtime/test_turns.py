"""The turn machine, sans I/O: drive it the way the gateway does (client messages, engine chunks, packets handed to
the socket, store results, ticks) and assert on what it says and remembers. No socket, no engine, no Redis: the
``Sim`` below plays the gateway's part with plain lists (a fake by design: the machine is the unit under test)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.base import PhonemeTiming, Timing, WordTiming
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
from realtime.turns import Finish, Limits, Send, Stop, Stream, Synthesize, TurnMachine, TurnState, cut_text
from sessions.model import Turn

RATE = 44100
FRAME = 2048  # engine samples per codec frame
FRAME_MS = 1000.0 * FRAME / RATE  # 46.44 ms
OUT_MS = 20.0  # output packet


@dataclass
class Sim:
    """The gateway's part, in lists: a stream lane, the messages the client got, a store."""

    history: list[Turn] = field(default_factory=list)
    max_frames: int = 2048
    frames_per_segment: int = 3
    limits: Limits = field(default_factory=Limits)
    timing: Callable[[Synthesize], Timing] | None = None  # the engine's word timing, known before its audio

    def __post_init__(self) -> None:
        self.now = 0.0
        self.m = TurnMachine(
            self.history,
            sample_rate=RATE,
            frame_ms=FRAME_MS,
            output_frame_ms=OUT_MS,
            max_frames=self.max_frames,
            limits=self.limits,
            clock=lambda: self.now,
        )
        self.stream: list[ServerMessage] = []
        self.got: list[ServerMessage] = []  # what the client received, in order
        self.stored: list[Turn] = list(self.history)
        self.engine_ms: dict[int, float] = {}  # per turn: audio made by the engine, for packetizing
        self.pending_write = None

    def apply(self, outputs: list) -> None:
        for out in outputs:
            if isinstance(out, Send):
                self.got.append(out.message)
            elif isinstance(out, Stream):
                self.stream.append(out.message)
            elif isinstance(out, Stop):
                self.stream = [m for m in self.stream
                               if not (isinstance(m, (Audio, Segment, Words, Visemes)) and m.turn in out.turns)]

    def send(self, msg: object) -> None:
        self.now += 0.01
        self.apply(self.m.receive(msg))  # type: ignore[arg-type]

    def job(self, frames: int | None = None, finish: bool = True) -> bool:
        """Run the next synthesis job to its end (as the engine would). False when there is none (or, with
        ``finish=False``, when the job is the turn's Finish: it is left running)."""
        job = self.m.next_job()
        if job is None:
            return False
        if isinstance(job, Finish):
            if not finish:
                return False
            if self.engine_ms.get(job.turn, 0.0) % OUT_MS:  # the encoder's last, padded packet
                self._packet(job.turn)
            self.apply(self.m.audio_finished(job.turn))
            return True
        assert isinstance(job, Synthesize)
        if self.timing is not None:
            self.stream.extend(self.m.segment_timing(job.turn, job.segment, self.timing(job)))
        for k in range(self.frames_per_segment if frames is None else frames):
            codes = np.full((10, 1), job.segment * 100 + k, dtype=np.int16)
            keep, announce = self.m.segment_audio(job.turn, job.segment, FRAME, codes)
            if announce is not None:
                self.stream.append(announce)
            before = self.engine_ms.get(job.turn, 0.0)
            after = before + keep * 1000.0 / RATE
            self.engine_ms[job.turn] = after
            for _ in range(int(after // OUT_MS) - int(before // OUT_MS)):
                self._packet(job.turn)
            if not self.m.wants_audio(job.turn):
                break
        self.apply(self.m.segment_finished(job.turn, job.segment))
        return True

    def _packet(self, turn: int) -> None:
        msg = self.m.packet(turn, b"x")
        if msg is not None:
            self.stream.append(msg)

    def deliver(self, n: int | None = None) -> None:
        """The send loop: hand ``n`` stream items (all) to the socket."""
        count = len(self.stream) if n is None else min(n, len(self.stream))
        for _ in range(count):
            self.now += 0.001
            msg = self.stream.pop(0)
            if isinstance(msg, TurnDone):
                final = self.m.done_sent(msg.turn, self.now)
                if final is None:
                    continue
                msg = final
            elif isinstance(msg, Audio):
                self.m.packet_sent(msg.turn, self.now)
            self.got.append(msg)

    def write(self, ok: bool = True) -> bool:
        """The writer: one write, succeeded or failed (a failed one is retried as it was)."""
        w = self.pending_write or self.m.next_write()
        if w is None:
            return False
        if not ok:
            self.pending_write = w
            self.apply(self.m.write_failed(w, "timeout"))
            return True
        self.pending_write = None
        if w.op == "append":
            if w.turn.index < len(self.stored):
                assert self.stored[w.turn.index] is w.turn, "a retry must be the same record"
            else:
                assert w.turn.index == len(self.stored), "appends in order"
                self.stored.append(w.turn)
        else:
            self.stored[w.turn.index] = w.turn
        self.m.write_ok(w)
        return True

    def run(self) -> None:
        """Synthesize, send and store everything that is waiting."""
        while self.job():
            self.deliver()
        self.deliver()
        while self.write():
            pass

    def say(self, text: str, speaker: int | None = None) -> int:
        self.send(Text(text, speaker=speaker))
        self.send(TurnEnd())
        turn = len(self.m.history)
        self.run()
        return turn

    def of(self, kind: type) -> list:
        return [m for m in self.got if isinstance(m, kind)]


def texts(sim: Sim) -> list[str]:
    return [m.markup for m in sim.of(Segment)]


# ---------------------------------------------------------------------------------------------- segmentation


def test_first_sentence_is_synthesized_before_the_rest_arrives() -> None:
    sim = Sim(history=[Turn(i, 0, "x", "complete", 10) for i in range(4)])
    sim.send(Text("Hello there", speaker=1))
    assert sim.got == [TurnStarted(turn=4, speaker=1)]
    sim.send(Text("."))
    assert sim.m.next_job() is None  # "." may still become "3.5"
    sim.send(Text(" How are"))
    job = sim.m.next_job()
    assert isinstance(job, Synthesize) and (job.turn, job.text, job.speaker) == (4, "Hello there.", 1)


def test_token_stream_gives_the_segments_of_the_whole_text() -> None:
    text = "First sentence here. Second one! And a third? Trailing words"
    whole, tokens = Sim(), Sim()
    whole.send(Text(text))
    whole.send(TurnEnd())
    for i in range(0, len(text), 3):
        tokens.send(Text(text[i : i + 3]))
    tokens.send(TurnEnd())
    whole.run()
    tokens.run()
    assert texts(whole) == texts(tokens) == ["First sentence here.", "Second one!", "And a third?", "Trailing words"]


def test_flush_cuts_and_keeps_the_turn_open() -> None:
    sim = Sim()
    sim.send(Text("no terminator yet"))
    sim.send(Flush())
    sim.run()
    assert texts(sim) == ["no terminator yet"]
    assert sim.m.state(0) is TurnState.OPEN and not sim.of(TurnDone)
    sim.send(Text("more"))
    sim.send(TurnEnd())
    sim.run()
    assert texts(sim) == ["no terminator yet", "more"]
    assert [d.reason for d in sim.of(TurnDone)] == ["complete"]


def test_a_speaker_change_inside_a_turn_is_an_inline_tag() -> None:
    sim = Sim()
    sim.send(Text("Hi. ", speaker=0))
    sim.send(Text("Hello back.", speaker=1))
    sim.send(TurnEnd())
    sim.run()
    assert texts(sim) == ["Hi.", "<|speaker:1|>Hello back."]
    assert sim.of(TurnStarted) == [TurnStarted(turn=0, speaker=0)]


def test_bad_turn_input_is_refused_with_a_named_error() -> None:
    sim = Sim(limits=Limits(turn_chars=50, buffered_chars=40))
    with pytest.raises(ProtocolError) as e:
        sim.send(TurnEnd())
    assert e.value.code == "bad_message"
    with pytest.raises(ProtocolError) as e:
        sim.send(Playback(turn=0, played_ms=10))
    assert e.value.code == "bad_message"  # turn 0 has not started
    sim.send(Text("x" * 30))
    with pytest.raises(ProtocolError) as e:
        sim.send(Text("y" * 20))
    assert e.value.code == "limit"  # waiting unsegmented
    sim.send(Text(". "))  # a sentence end: the buffer is cut
    sim.send(Text("z" * 10))
    with pytest.raises(ProtocolError) as e:
        sim.send(Text("w" * 20))
    assert e.value.code == "limit"  # per turn
    sim.send(TurnEnd())  # still usable
    sim.run()
    assert [d.reason for d in sim.of(TurnDone)] == ["complete"]


# ---------------------------------------------------------------------------------------------- the lifecycle


def test_a_complete_turn_goes_through_every_state_and_is_stored_once() -> None:
    sim = Sim()
    sim.send(Text("One. Two."))
    assert sim.m.state(0) is TurnState.OPEN
    sim.send(TurnEnd())
    assert sim.m.state(0) is TurnState.ENDING
    while sim.job():
        pass
    assert sim.m.state(0) is TurnState.FINISHING
    sim.deliver()
    assert sim.m.state(0) is TurnState.DONE
    done = sim.of(TurnDone)[0]
    audio = sim.of(Audio)
    assert done.reason == "complete" and done.frames == len(audio) and done.audio_ms == pytest.approx(len(audio) * OUT_MS)
    assert [a.seq for a in audio] == list(range(len(audio)))
    assert sim.write() and not sim.write()
    assert [(t.index, t.text, t.state) for t in sim.stored] == [(0, "One. Two.", "complete")]
    assert sim.stored[0].codes.shape == (10, 6)  # 2 segments x 3 frames
    assert sim.m.tick(sim.now + 31.0) == [] and sim.m.state(0) is TurnState.SETTLED


def test_turn_done_counts_what_the_socket_really_sent() -> None:
    sim = Sim()
    sim.send(Text("Hello there. "))
    sim.job()
    sim.deliver(3)  # the segment message and two packets out, the rest queued
    sim.send(Cancel())
    sim.deliver()
    done = sim.of(TurnDone)[0]
    assert (done.reason, done.frames, done.audio_ms) == ("cancelled", 2, 2 * OUT_MS)
    sim.write()
    assert sim.stored[0].audio_ms == 40 and sim.stored[0].codes.shape[1] == 1  # the one frame that had started


@pytest.mark.parametrize("where", ["open-idle", "open-synthesizing", "ending", "finishing"])
def test_cancel_in_every_live_state_ends_the_turn_once(where: str) -> None:
    sim = Sim()
    sim.send(Text("A first sentence. A second one. "))
    if where != "open-idle":
        sim.job()
        sim.deliver()
    if where in ("ending", "finishing"):
        sim.send(TurnEnd())
    if where == "finishing":
        while sim.job(finish=False):  # the Finish job is handed out (the encoder is being flushed)
            pass
        assert sim.m.state(0) is TurnState.FINISHING
    sim.send(Cancel())
    sim.send(Cancel())  # idempotent
    sim.run()
    assert [d.reason for d in sim.of(TurnDone)] == ["cancelled"]
    assert sim.m.next_job() is None and sim.m.packet(0, b"late") is None  # nothing more of it goes out
    assert [t.state for t in sim.stored] == ["cancelled"]
    sim.say("Next one.")  # the session goes on
    assert [d.reason for d in sim.of(TurnDone)] == ["cancelled", "complete"]


def test_cancel_after_turn_done_or_with_nothing_active_does_nothing() -> None:
    sim = Sim()
    assert sim.m.receive(Cancel()) == []
    sim.say("Done already.")
    assert sim.m.receive(Cancel()) == []


# ---------------------------------------------------------------------------------------------- what was heard


def test_playback_after_turn_done_cuts_the_stored_turn_at_the_words_heard() -> None:
    sim = Sim(frames_per_segment=10)
    sim.say("one two three four five six seven eight nine ten")
    full = sim.stored[0]
    assert full.audio_ms == pytest.approx(10 * FRAME_MS, abs=OUT_MS)
    sim.send(Playback(turn=0, played_ms=full.audio_ms * 0.33))
    sim.run()
    cut = sim.stored[0]
    assert cut.audio_ms == round(full.audio_ms * 0.33)
    assert cut.text == "one two three four"  # the words whose first character lies before a third of the text
    assert cut.codes.shape[1] == math.ceil(cut.audio_ms / FRAME_MS)  # the frames that had started
    assert cut.created_at == full.created_at
    sim.send(Playback(turn=0, played_ms=full.audio_ms * 0.9))  # a cut never grows
    sim.run()
    assert sim.stored[0] is cut


def test_playback_long_after_cancel_is_honoured() -> None:
    sim = Sim(frames_per_segment=10)
    sim.send(Text("Alpha beta gamma delta epsilon. Zeta eta theta. "))
    sim.job()
    sim.deliver()
    sim.send(Cancel())
    sim.run()
    sent = sim.stored[0].audio_ms
    sim.now += 2.0
    sim.send(Playback(turn=0, played_ms=50.0))
    sim.run()
    assert sent > 400 and sim.stored[0].audio_ms == 50 and sim.stored[0].text == "Alpha"


def test_a_report_during_the_turn_cuts_only_if_it_is_then_cancelled() -> None:
    sim = Sim()
    sim.send(Text("Keep all of this. "))
    sim.job()
    sim.deliver()
    sim.send(Playback(turn=0, played_ms=10.0))  # progress, while it plays
    sim.send(TurnEnd())
    sim.run()
    assert sim.stored[0].text == "Keep all of this." and sim.stored[0].audio_ms > 100
    sim.send(Text("Cut this one please. "))
    sim.job()
    sim.deliver()
    sim.send(Playback(turn=1, played_ms=15.0))
    sim.send(Cancel())
    sim.run()
    assert sim.stored[1].audio_ms == 15 and sim.stored[1].text == "Cut"


def test_late_reports_are_bounded() -> None:
    sim = Sim(limits=Limits(audible_s=30.0, audible_turns=2))
    sim.say("Zero.")
    sim.now += 31.0
    sim.m.tick(sim.now)
    with pytest.raises(ProtocolError) as e:
        sim.send(Playback(turn=0, played_ms=1.0))
    assert e.value.code == "limit"
    for text in ("One.", "Two.", "Three."):
        sim.say(text)
    with pytest.raises(ProtocolError):  # only the last 2 finished turns stay audible
        sim.send(Playback(turn=1, played_ms=1.0))
    sim.send(Playback(turn=3, played_ms=5.0))  # the listener is in turn 3: turn 2 is behind it
    assert sim.m.state(2) is TurnState.SETTLED
    assert sim.stored[1].text == "One."


def test_cut_text_keeps_the_words_that_had_started() -> None:
    assert cut_text("hello big world", 0.0) == ""
    assert cut_text("hello big world", 0.01) == "hello"
    assert cut_text("hello big world", 6 / 15) == "hello"
    assert cut_text("hello big world", 6.5 / 15) == "hello big"
    assert cut_text("hello big world", 1.0) == "hello big world"
    assert cut_text("[whisper] so quiet", 0.5) == "[whisper]"
    assert cut_text("[whisper] so quiet", 0.6) == "[whisper] so"


# ---------------------------------------------------------------------------------------------- limits


def test_max_frames_ends_the_turn_as_length_with_exact_frames() -> None:
    sim = Sim(max_frames=5, frames_per_segment=4)
    sim.send(Text("One sentence. Another sentence. A third. "))
    sim.send(TurnEnd())
    sim.run()
    assert [d.reason for d in sim.of(TurnDone)] == ["length"]
    assert sim.stored[0].codes.shape == (10, 5)
    assert texts(sim) == ["One sentence.", "Another sentence."]  # the third never started


def test_max_frames_is_exact_over_long_turns() -> None:
    # the gateway once used 1000/21.5 ms per frame: past ~325 frames a turn that hit the limit read "complete"
    sim = Sim(max_frames=400, frames_per_segment=500)
    sim.say("A long one.")
    assert sim.of(TurnDone)[0].reason == "length" and sim.stored[0].codes.shape == (10, 400)


def test_engine_failure_ends_the_turn_as_error() -> None:
    sim = Sim()
    sim.send(Text("First. Second. Third. "))
    job = sim.m.next_job()
    assert isinstance(job, Synthesize)
    sim.apply(sim.m.segment_finished(job.turn, job.segment, "worker lost"))
    assert isinstance(sim.got[-1], Error) and sim.got[-1].code == "engine_unavailable"
    sim.send(TurnEnd())
    sim.run()
    assert [d.reason for d in sim.of(TurnDone)] == ["error"] and sim.stored[0].state == "error"


# ---------------------------------------------------------------------------------------------- the store


@pytest.mark.parametrize("where", ["open", "ending", "done", "amend"])
def test_a_store_outage_in_any_state_loses_nothing_and_is_told_once(where: str) -> None:
    sim = Sim(frames_per_segment=5)
    sim.say("Before the outage.")
    sim.send(Text("During it. "))
    if where != "open":
        sim.send(TurnEnd())
    if where in ("done", "amend"):
        while sim.job():
            pass
        sim.deliver()
    if where == "amend":
        sim.send(Playback(turn=1, played_ms=50.0))
    for _ in range(5):  # the store is down: every write fails and is retried as it was
        if not sim.write(ok=False):
            break
    errors = [m for m in sim.got if isinstance(m, Error)]
    if sim.m.has_write():
        assert len(errors) == 1 and errors[0].code == "internal"
    sim.send(TurnEnd()) if where == "open" else None
    sim.run()  # the store is back
    assert [t.index for t in sim.stored] == [0, 1]
    assert sim.stored[1].text == ("During" if where == "amend" else "During it.")


def test_the_backlog_is_bounded_and_refused_with_limit() -> None:
    sim = Sim(limits=Limits(max_unstored=3))
    for i in range(3):
        sim.send(Text(f"Turn {i}."))
        sim.send(TurnEnd())
        while sim.job():
            pass
        sim.deliver()
    assert sim.m.unstored == 3
    with pytest.raises(ProtocolError) as e:
        sim.send(Text("One too many."))
    assert e.value.code == "limit" and "store" in e.value.message
    sim.run()
    sim.say("Now it fits.")
    assert [t.text for t in sim.stored] == ["Turn 0.", "Turn 1.", "Turn 2.", "Now it fits."]


def test_a_cut_while_the_append_is_in_flight_is_stored_after_it() -> None:
    sim = Sim(frames_per_segment=10)
    sim.send(Text("one two three four five. "))
    sim.send(TurnEnd())
    while sim.job():
        pass
    sim.deliver()
    w = sim.m.next_write()
    sim.send(Playback(turn=0, played_ms=100.0))  # arrives while that append is on its way
    sim.stored.append(w.turn)
    sim.m.write_ok(w)
    assert sim.write() and sim.stored[0].audio_ms == 100


def test_close_remembers_every_live_turn_as_sent() -> None:
    sim = Sim()
    sim.send(Text("Being said now. And more. "))
    sim.job()
    sim.deliver(3)
    ended = sim.m.close(sim.now)
    assert ended == [(0, "cancelled")]
    sim.run()
    assert sim.stored[0].state == "cancelled" and sim.stored[0].audio_ms == 40  # 2 packets + a segment message


# ---------------------------------------------------------------------------------------------- properties

CONTEXT = st.sampled_from([None, "a", "b"])
SAY = st.tuples(st.just("say"), st.none())  # a whole turn, run to its end
PLAYBACK = st.tuples(st.just("playback"), st.tuples(st.integers(0, 2), st.sampled_from([0.0, 15.0, 50.0, 150.0, 400.0, 9e3])))
OPS = st.one_of(
    SAY,
    PLAYBACK,
    PLAYBACK,  # weighted: reports against finished turns are where cuts happen
    st.tuples(st.just("text"), st.tuples(st.sampled_from(["Hi", " there. ", "Yes! ", "word ", "\n"]), CONTEXT)),
    st.tuples(st.just("flush"), CONTEXT),
    st.tuples(st.just("end"), CONTEXT),
    st.tuples(st.just("cancel"), st.one_of(st.none(), CONTEXT)),
    st.tuples(st.just("job"), st.integers(0, 4)),
    st.tuples(st.just("deliver"), st.integers(0, 8)),
    st.tuples(st.just("write"), st.booleans()),
    st.tuples(st.just("tick"), st.sampled_from([0.5, 5.0, 31.0])),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, max_size=60))
def test_random_sessions_keep_every_invariant(ops: list) -> None:
    sim = Sim(frames_per_segment=2, limits=Limits(max_unstored=4, audible_turns=3))
    cuts: dict[int, int] = {}

    def check_cuts() -> None:
        for t in sim.m.history:
            if t.state == "open":  # a stand-in holding the place of a turn still being spoken: not a cut
                continue
            assert t.audio_ms <= cuts.get(t.index, t.audio_ms), "a cut never grows"
            cuts[t.index] = t.audio_ms

    for op, arg in ops:
        try:
            if op == "text":
                sim.send(Text(arg[0], context=arg[1]))
            elif op == "say":
                sim.say("Some words here. And more. ")
            elif op == "flush":
                sim.send(Flush(context=arg))
            elif op == "end":
                sim.send(TurnEnd(context=arg))
            elif op == "cancel":
                sim.send(Cancel(context=arg))
            elif op == "playback":
                sim.send(Playback(turn=arg[0], played_ms=arg[1]))
            elif op == "job":
                sim.job(frames=arg)
            elif op == "deliver":
                sim.deliver(arg)
            elif op == "write":
                sim.write(ok=arg)
            elif op == "tick":
                sim.now += arg
                sim.apply(sim.m.tick(sim.now))
        except ProtocolError as exc:
            assert exc.code in ("bad_message", "limit")
        check_cuts()
    # the client ends every turn; everything runs out; the connection closes
    for context in (None, "a", "b"):
        try:
            sim.send(TurnEnd(context=context))
        except ProtocolError:
            pass
    sim.run()
    sim.m.close(sim.now)
    sim.pending_write = None if sim.pending_write is None else sim.pending_write
    while sim.write():
        pass
    check_cuts()

    started = [m.turn for m in sim.of(TurnStarted)]
    done = [m.turn for m in sim.of(TurnDone)]
    assert started == sorted(set(started)) == list(range(len(started)))
    assert len(done) == len(set(done)), "one turn.done per turn"
    assert set(done) <= set(started)
    for turn in started:  # audio.ms is monotonic and packets are numbered in order, per turn
        audio = [m for m in sim.of(Audio) if m.turn == turn]
        assert [a.seq for a in audio] == sorted(a.seq for a in audio)
        assert all(b.ms > a.ms for a, b in itertools.pairwise(audio))
        finals = [d for d in sim.of(TurnDone) if d.turn == turn]
        if finals:
            assert finals[0].frames == len(audio)
    # every turn is remembered once, in order, and the store holds exactly that
    assert [t.index for t in sim.m.history] == list(range(len(started)))
    assert [t.index for t in sim.stored] == list(range(len(started)))
    assert [t.audio_ms for t in sim.stored] == [t.audio_ms for t in sim.m.history]


# ---------------------------------------------------------------------------------------------- concurrent contexts


def test_contexts_synthesize_side_by_side_and_are_remembered_in_start_order() -> None:
    sim = Sim(frames_per_segment=2)
    sim.send(Text("Guard one speaks. ", speaker=0, context="a"))
    sim.send(Text("Guard two answers. ", speaker=1, context="b"))
    assert [(m.turn, m.speaker, m.context) for m in sim.of(TurnStarted)] == [(0, 0, "a"), (1, 1, "b")]
    assert sim.m.job_contexts() == ["a", "b"]  # both have work at once
    first_b = sim.m.next_job("b")
    first_a = sim.m.next_job("a")
    assert isinstance(first_a, Synthesize) and isinstance(first_b, Synthesize)
    assert (first_a.turn, first_b.turn) == (0, 1)
    sim.send(TurnEnd(context="b"))
    sim.send(TurnEnd(context="a"))
    sim.m.next_job("a")  # nothing yet: a's segment is still running
    for job in (first_b, first_a):  # the engine finishes b first
        sim.m.segment_audio(job.turn, job.segment, FRAME, np.zeros((10, 1), np.int16))
        sim.apply(sim.m.segment_finished(job.turn, job.segment))
    finish_b = sim.m.next_job("b")
    assert finish_b == Finish(1)
    sim.apply(sim.m.audio_finished(1))
    sim.deliver()  # b's turn.done goes out while a is still finishing
    assert [t.state for t in sim.m.history] == ["open", "complete"]  # turn 0's place held until it ends
    sim.run()
    assert [(d.turn, d.context) for d in sim.of(TurnDone)] == [(1, "b"), (0, "a")]
    assert [(t.index, t.context, t.speaker) for t in sim.stored] == [(0, "a", 0), (1, "b", 1)]
    assert sim.stored[0].started_at is not None and sim.stored[0].started_at <= sim.stored[1].started_at


def test_cancel_with_a_context_stops_only_that_one_and_without_one_stops_all() -> None:
    sim = Sim()
    for ctx in ("a", "b", "c"):
        sim.send(Text(f"Line of {ctx}. ", context=ctx))
    sim.send(Cancel(context="b"))
    sim.send(TurnEnd(context="a"))
    sim.send(TurnEnd(context="c"))
    sim.run()
    assert {d.context: d.reason for d in sim.of(TurnDone)} == {"a": "complete", "b": "cancelled", "c": "complete"}
    for ctx in ("a", "b"):
        sim.send(Text("Again. ", context=ctx))
    sim.send(Cancel())
    sim.run()
    assert [d.reason for d in sim.of(TurnDone)][-2:] == ["cancelled", "cancelled"]


def test_the_ninth_context_is_refused_and_the_session_goes_on() -> None:
    sim = Sim()
    for i in range(8):
        sim.send(Text("Hello. ", context=f"npc-{i}"))
    with pytest.raises(ProtocolError) as e:
        sim.send(Text("One more. ", context="npc-8"))
    assert e.value.code == "limit"
    sim.send(Text("More from one already open. ", context="npc-3"))  # a context in flight is fine
    sim.send(Cancel(context="npc-0"))
    sim.run()
    sim.send(Text("Now it fits. ", context="npc-8"))
    assert sim.of(TurnStarted)[-1].context == "npc-8"


def test_a_report_cuts_only_its_own_turn_and_leaves_other_contexts_audible() -> None:
    sim = Sim(frames_per_segment=10)
    sim.send(Text("alpha beta gamma delta. ", context="a"))
    sim.send(Text("one two three four. ", context="b"))
    sim.send(TurnEnd(context="a"))
    sim.send(TurnEnd(context="b"))
    sim.run()
    sim.send(Playback(turn=1, played_ms=40.0))
    sim.run()
    assert sim.stored[1].text == "one" and sim.stored[1].audio_ms == 40
    assert sim.stored[0].text == "alpha beta gamma delta." and sim.m.state(0) is TurnState.DONE
    sim.send(Playback(turn=0, played_ms=40.0))  # still audible: turn 1's report was about another context
    sim.run()
    assert sim.stored[0].text == "alpha"


def test_a_turn_held_open_in_one_context_does_not_hold_back_the_others() -> None:
    sim = Sim(limits=Limits(max_unstored=4))
    sim.send(Text("Still thinking", context="a"))  # open: an LLM is still streaming it
    for i in range(6):  # more than the store backlog bound: none of these may wait for "a"
        sim.send(Text(f"Line {i}. ", context="b"))
        sim.send(TurnEnd(context="b"))
        sim.run()
    assert [t.state for t in sim.stored] == ["open"] + ["complete"] * 6  # a's place is held, b's lines are stored
    assert [p.text for p in sim.m.past(7)][-1] == "Line 5."  # and heard by the next prompt
    sim.send(Text(" and done. ", context="a"))
    sim.send(TurnEnd(context="a"))
    sim.run()
    assert (sim.stored[0].state, sim.stored[0].text) == ("complete", "Still thinking and done.")  # amended


# ---------------------------------------------------------------------------------------------- word timing

# "One two three four." as an engine might time it: word i starts at STARTS[i] samples from the segment's start
STARTS = (0, 1000, 5000, 9000)
WORD_TIMING = Timing(
    words=tuple(WordTiming(i, s, e) for i, (s, e) in enumerate(zip(STARTS, (*STARTS[1:], 12000)))),
    phonemes=(PhonemeTiming("w", 0), PhonemeTiming("ʌ", 400), PhonemeTiming("t", 1000), PhonemeTiming("uː", 1500),
              PhonemeTiming("", 12000)),
)


def ms_of(sample: int) -> float:
    return round(sample * 1000.0 / RATE, 1)


@pytest.mark.parametrize("played", [ms_of(5000) - 0.1, ms_of(5000) + 0.1, ms_of(9000) + 0.1, 0.0])
def test_a_cut_with_word_timing_keeps_exactly_the_words_started_before_it(played: float) -> None:
    sim = Sim(frames_per_segment=6, timing=lambda job: WORD_TIMING)
    turn = sim.say("One two three four.")
    sim.send(Playback(turn=turn, played_ms=played))
    while sim.write():
        pass
    heard = [w for w, start in zip("One two three four.".split(), STARTS) if ms_of(start) < played]
    assert sim.stored[turn].text == " ".join(heard)


def test_word_timing_goes_out_before_the_audio_it_covers() -> None:
    sim = Sim(frames_per_segment=6, timing=lambda job: WORD_TIMING)
    sim.m.timestamps = "visemes"
    sim.say("[whisper] One two. <|speaker:2|>three four.")
    kinds = [type(m).__name__ for m in sim.got if not isinstance(m, TurnStarted)]
    # each segment: segment, words, visemes, then its audio
    assert kinds[:3] == ["Segment", "Words", "Visemes"] and kinds[3] == "Audio"
    segments, words = sim.of(Segment), sim.of(Words)
    assert [(s.text, s.markup, s.speaker) for s in segments] == [
        ("One two.", "[whisper] One two.", 0),
        ("three four.", "<|speaker:2|>three four.", 0),
    ]
    first = words[0]
    assert [w["text"] for w in first.words] == ["One", "two."] and first.estimated is False
    assert [w["start_ms"] for w in first.words] == [ms_of(0), ms_of(1000)]
    # the second segment's times continue on the turn's clock, from its first sample
    offset = 6 * FRAME
    assert [w["start_ms"] for w in words[1].words] == [ms_of(offset), ms_of(offset + 1000)]
    visemes = sim.of(Visemes)[0].visemes
    assert [v["id"] for v in visemes] == [14, 10, 4, 14, 0] and visemes[1]["start_ms"] == ms_of(400)


def test_without_timestamps_no_timing_messages_go_out_but_the_cut_uses_them() -> None:
    sim = Sim(frames_per_segment=6, timing=lambda job: WORD_TIMING)
    turn = sim.say("One two three four.")
    assert not sim.of(Words) and not sim.of(Visemes)
    assert sim.of(Segment)[0].text == "One two three four."
    sim.send(Playback(turn=turn, played_ms=ms_of(1000) + 0.1))
    while sim.write():
        pass
    assert sim.stored[turn].text == "One two"


def test_words_past_the_frame_budget_are_left_out() -> None:
    sim = Sim(frames_per_segment=6, max_frames=3, timing=lambda job: WORD_TIMING)  # 3 frames = 6144 samples
    sim.m.timestamps = "words"
    sim.say("One two three four.")
    words = sim.of(Words)[0].words
    assert [w["text"] for w in words] == ["One", "two", "three"]
    assert words[-1]["end_ms"] == ms_of(3 * FRAME)  # the last one heard is cut where the audio stops


def test_a_long_conversation_keeps_only_its_recent_turns_in_memory() -> None:
    """A session that talks for hours holds a bounded conversation in memory: the last ``context_turns`` stored turns
    (the engine's context); older ones are only in the store (found by a 30-minute soak: memory grew with every turn)."""
    sim = Sim(limits=Limits(context_turns=10))
    for i in range(40):
        sim.say(f"Line number {i}.")
    kept = [t for t in sim.m.history if t is not None]
    assert len(sim.m.history) == 40 and [t.index for t in kept] == list(range(30, 40))
    assert [p.text for p in sim.m.past(40)] == [f"Line number {i}." for i in range(30, 40)]
    assert len(sim.stored) == 40  # the store has them all
    sim.send(Playback(turn=39, played_ms=1.0))  # a recent turn can still be cut
    while sim.write():
        pass
    assert sim.stored[39].text == "Line"
    resumed = TurnMachine(list(sim.stored), sample_rate=RATE, frame_ms=FRAME_MS, output_frame_ms=OUT_MS,
                          max_frames=2048, limits=Limits(context_turns=10))
    assert sum(t is not None for t in resumed.history) == 10 and resumed.next_turn == 40
