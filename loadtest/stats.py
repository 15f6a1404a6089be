"""Statistics from the raw events: a separate step, so a run can be re-analysed without re-running it.

Definitions (all times on the load-test client's clock):

- TTFA: from sending the message that completes the turn's first segment to receiving the turn's first
  ``audio``. The first ``segment`` message names the text; its end is found in the turn's text, and the first
  message that carries text past it (or ``turn.end``) is the one that lets the server cut the segment (the
  server knows a sentence ended only when the next character arrives).
- gap: time between consecutive ``audio`` messages of a turn (until a barge-in).
- underruns: the :class:`~loadtest.player.Player` replayed over the recorded arrivals (must match the live one).
- rtf (real-time factor): (last audio - TTFA start) / audio duration; < 1 means the audio came faster than it
  plays (pacing keeps long turns just under 1).
- cancel: from sending ``cancel`` to ``turn.done``; ``audio_after_cancel`` counts the cancelled turn's audio that
  still arrived after the cancel was sent (in flight, or sent late), and how long after.
- word timing (``--timestamps``): ``timing`` counts the ``words`` and ``visemes`` messages. A ``words`` message
  must arrive before the first audio packet it covers: when it arrives, no audio packet of its turn already
  received may end (``ms + frame_ms``) after its first word's ``start_ms`` (sanity rule ``words_after_audio``); it
  follows its segment's ``segment`` (``words_before_segment``), ``visemes`` follow their ``words``
  (``visemes_before_words``), and neither comes unasked (``timing_unrequested``).
- floor: a bare WebSocket round trip (:mod:`loadtest.floor`); overhead = TTFA percentile - floor percentile.
- headline: server CPU per stream, the gateway processes' mean CPU (% of one core, summed over the processes
  listening on the served port) over the mean concurrent streams; ``with_children`` adds the rest of the server's
  process tree (engine workers, Redis). Beside it the floor: the bare round trip's p50 and, when meta.json has
  ``codec_floor_pct``, the codec's own cost per stream. CPU is sampled in the measured window.
- streams: audio seconds received in the measured window / window length (average concurrent real-time streams);
  every playing context counts. ``streams_peak``: the most turns playing at once (a turn plays from its player's
  start until its audio, stalls included, has played out, or until its barge-in).

Contexts (``--contexts N``): every turn belongs to one context of its session (``None``: the default context).
``others`` of a turn: how many of its session's other contexts had a turn in flight (begun, no ``turn.done``
yet) when it began; ``contexts.ttfa_ms_alone`` / ``ttfa_ms_with_others`` split TTFA by that. The *first round*
is each session's first turn of every context, sent together when the session starts (warm-up included): its
TTFA by rank (the order the contexts began) and, per session, each later context's TTFA over the first's.
``interleaved_turns``: turns whose audio arrived while another context of the session was receiving audio.

Telephony (``--telephony``): a turn's audio is what its phone call played (``a`` events from the Media Stream) and
its barge-in the call's ``clear`` (the caller's voice, not a ``cancel``). The application's messages and the call's
audio travel on two sockets, so the rules that order audio against the turn's messages (audio_before_turn_started,
audio_before_segment, audio_after_done, done_frames, cancelled_without_cancel) do not apply; the call's own are in
:mod:`loadtest.callstats`, which adds the ``telephony`` section.

Turns that start before ``ramp_s + warmup_s`` are warm-up and excluded; errors and sanity checks cover the
whole run. ``sanity`` lists impossible orderings; a run with any is not to be trusted.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.callstats import CALL_EVENTS, Calls
from loadtest.player import Player
from loadtest.record import EVENTS_FILE, META_FILE, read_events

_TAG = re.compile(r"<\|[^|>]{0,40}\|>")
PERCENTILES = (50, 90, 99)


def dist(values: list[float] | np.ndarray) -> dict[str, float | int | None]:
    """p50 / p90 / p99 / max / mean / n of a sample (None for an empty one)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None, "n": 0}
    p = np.percentile(a, PERCENTILES)
    out: dict[str, float | int | None] = {f"p{q}": round(float(v), 3) for q, v in zip(PERCENTILES, p)}
    out.update(max=round(float(a.max()), 3), mean=round(float(a.mean()), 3), n=int(a.size))
    return out


@dataclass
class TurnLog:
    sid: int
    k: int
    t_start: float
    speaker: int
    text: str
    barge_after_ms: float | None
    sends: list[tuple[float, str, int]] = field(default_factory=list)  # (t, what, chars)
    t_started: float | None = None  # turn.started
    segments: list[tuple[float, float, str]] = field(default_factory=list)  # (t, ms, text)
    audio: list[float] = field(default_factory=list)  # arrival times
    audio_end_ms: float = 0.0  # the latest end (ms + frame_ms, turn time) of the audio received so far, cancelled too
    words_messages: int = 0
    visemes_messages: int = 0
    audio_after_cancel: int = 0
    t_last_after_cancel: float | None = None
    last_seq: int = -1
    t_cancel: float | None = None  # the listener dropped the turn: cancel sent (telephony: the call cleared)
    cancel_sent: bool = False
    done: list[Any] | None = None
    player: Player | None = None
    concurrency: int = 0
    context: str | None = None  # None: the default context
    others: int = 0  # the session's other contexts with a turn in flight when this one began
    rank: int | None = None  # first round: the order its context's first turn began in the session (else None)

    @property
    def t_ready(self) -> float | None:
        """When the message that completed the first segment was sent (see the module docstring)."""
        if not self.segments:
            return None
        seg = _TAG.sub("", self.segments[0][2]).strip()
        if not seg:
            return None
        off = self.text.find(seg)
        if off < 0:
            return None
        end = off + len(seg)
        for t, what, chars in self.sends:
            if what == "text" and chars > end or what in ("turn.end", "flush"):
                return t
        return None

    @property
    def ttfa_ms(self) -> float | None:
        ready = self.t_ready
        if ready is None or not self.audio:
            return None
        return (self.audio[0] - ready) * 1000.0

    @property
    def reason(self) -> str:
        return str(self.done[4]) if self.done is not None else "unfinished"

    def playing(self, frame_ms: float) -> tuple[float, float] | None:
        """(start, end) of its playback on the simulated player, or None if nothing played."""
        assert self.player is not None
        p = self.player
        if not self.audio:
            return None
        start = p.started_at if p.started_at is not None else self.audio[-1]
        if p.stopped:
            return start, max(start, self.t_cancel if self.t_cancel is not None else start)
        return start, start + (len(self.audio) * frame_ms + p.underrun_ms) / 1000.0


@dataclass
class _SessionLog:
    sid: int
    t_conn: float | None = None
    t_open: float | None = None
    t_ready: float | None = None
    t_close: float | None = None
    close_why: str | None = None
    frame_ms: float = 20.0
    last_t: float = -math.inf
    turns: dict[int, TurnLog] = field(default_factory=dict)
    current: dict[str | None, TurnLog] = field(default_factory=dict)  # context -> its latest turn


class _Sanity:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def fail(self, rule: str, detail: str) -> None:
        self.counts[rule] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{rule}: {detail}")

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.counts, "violations": dict(self.counts), "examples": self.examples}


@dataclass
class _Timing:
    """The word timing traffic (``words`` and ``visemes`` messages) and its ordering rules."""

    requested: str  # output.timestamps: none | words | visemes
    words_messages: int = 0
    words: int = 0
    estimated_messages: int = 0
    visemes_messages: int = 0
    visemes: int = 0

    def on_words(self, sanity: _Sanity, log: TurnLog, n: int, first_ms: float | None, estimated: bool) -> None:
        self.words_messages += 1
        self.words += n
        self.estimated_messages += bool(estimated)
        where = f"session {log.sid} turn {log.k}"
        if self.requested == "none":
            sanity.fail("timing_unrequested", f"{where}: words with output.timestamps none")
        log.words_messages += 1
        if log.words_messages > len(log.segments):
            sanity.fail("words_before_segment", f"{where}: words message {log.words_messages}, segments {len(log.segments)}")
        if first_ms is not None and log.audio_end_ms > first_ms + 1e-6:
            sanity.fail("words_after_audio", f"{where}: words from {first_ms} ms after audio up to {log.audio_end_ms} ms")

    def on_visemes(self, sanity: _Sanity, log: TurnLog, n: int) -> None:
        self.visemes_messages += 1
        self.visemes += n
        where = f"session {log.sid} turn {log.k}"
        if self.requested != "visemes":
            sanity.fail("timing_unrequested", f"{where}: visemes with output.timestamps {self.requested}")
        log.visemes_messages += 1
        if log.visemes_messages > log.words_messages:
            sanity.fail("visemes_before_words", f"{where}: visemes message {log.visemes_messages}, words {log.words_messages}")

    def to_json(self) -> dict[str, Any]:
        return {
            "requested": self.requested, "words_messages": self.words_messages, "words": self.words,
            "estimated_messages": self.estimated_messages, "visemes_messages": self.visemes_messages,
            "visemes": self.visemes,
        }


def timing_shown(summary: dict[str, Any]) -> bool:
    """Is a summary's word timing worth a line: asked for, or (unasked) seen? (Summaries before it have none.)"""
    t = summary.get("timing")
    return bool(t) and (t["requested"] != "none" or t["words_messages"] + t["visemes_messages"] > 0)


@dataclass
class Analysis:
    """Everything the report needs: the summary plus per-turn rows and time series."""

    summary: dict[str, Any]
    turns: list[TurnLog]
    cpu: list[list[Any]]
    floor: list[tuple[float, float]]
    lag: list[tuple[float, float]]
    concurrency: list[tuple[float, int]]


def analyse(raw_dir: Path, ttfa_p99_ms: float | None = None, max_underruns: int | None = None) -> Analysis:
    meta = json.loads((raw_dir / META_FILE).read_text())
    config = meta["config"]
    prebuffer = float(config.get("prebuffer_ms", 0.0))
    measure_from = float(config["ramp_s"]) + float(config["warmup_s"])
    n_contexts = int(config.get("contexts", 1))
    context_ids: set[str | None] = {None} if n_contexts == 1 else {f"c{c}" for c in range(n_contexts)}
    duration = float(config["duration_s"])
    telephony = bool(config.get("telephony", False))
    one_socket = not telephony  # the turn's audio comes on the socket of its other messages
    sanity = _Sanity()
    calls = Calls(sanity.fail)
    timing = _Timing(str(config.get("timestamps", "none")))
    sessions: dict[int, _SessionLog] = {}
    errors: Counter[str] = Counter()
    fatal_errors = 0
    floor: list[tuple[float, float]] = []
    cpu: list[list[Any]] = []
    lag: list[tuple[float, float]] = []
    pings: list[tuple[float, float]] = []
    opens: list[float] = []
    closes: list[float] = []

    def session(sid: int, t: float) -> _SessionLog:
        s = sessions.get(sid)
        if s is None:
            s = sessions[sid] = _SessionLog(sid)
        if t < s.last_t - 1e-9:
            sanity.fail("time_order", f"session {sid}: event at {t:.6f} after one at {s.last_t:.6f}")
        s.last_t = max(s.last_t, t)
        return s

    def turn_of(s: _SessionLog, turn: int, kind: str, ctx: str | None) -> TurnLog | None:
        log = s.turns.get(turn)
        if log is None:
            sanity.fail("unknown_turn", f"session {s.sid}: {kind} for turn {turn} the client never began")
        elif ctx != log.context:
            sanity.fail("turn_context", f"session {s.sid}: {kind} of turn {turn} in context {ctx!r}, the turn's is {log.context!r}")
        return log

    for ev in read_events(raw_dir / EVENTS_FILE):
        kind, t = ev[0], ev[1]
        if kind == "a":
            _, _, sid, turn, seq, ms, _nbytes, *rest = ev
            s = session(sid, t)
            log = turn_of(s, turn, "audio", rest[0] if rest else None)
            if log is None:
                continue
            log.audio_end_ms = max(log.audio_end_ms, ms + s.frame_ms)
            if log.t_started is None and one_socket:
                sanity.fail("audio_before_turn_started", f"session {sid} turn {turn}")
            if log.done is not None and one_socket:
                sanity.fail("audio_after_done", f"session {sid} turn {turn} seq {seq}")
            if log.t_cancel is None:
                n = len(log.audio)
                if seq != n:
                    sanity.fail("audio_seq", f"session {sid} turn {turn}: seq {seq}, expected {n}")
            elif seq <= log.last_seq:  # after a cancel the server drops queued packets: gaps, but still in order
                sanity.fail("audio_seq", f"session {sid} turn {turn}: seq {seq} after {log.last_seq}")
            log.last_seq = seq
            if abs(ms - seq * s.frame_ms) > 0.5:
                sanity.fail("audio_ms", f"session {sid} turn {turn}: seq {seq} at {ms} ms, frame {s.frame_ms} ms")
            if not log.segments and one_socket:
                sanity.fail("audio_before_segment", f"session {sid} turn {turn}")
            if log.t_cancel is not None:
                log.audio_after_cancel += 1
                log.t_last_after_cancel = t
                continue
            log.audio.append(t)
            assert log.player is not None
            log.player.push(t, s.frame_ms)
        elif kind == "send":
            _, _, sid, k, what, chars = ev
            s = session(sid, t)
            log = s.turns.get(k)
            if log is None:
                sanity.fail("send_before_turn", f"session {sid} turn {k}")
                continue
            log.sends.append((t, what, chars))
            if what == "cancel":
                log.t_cancel, log.cancel_sent = t, True
                assert log.player is not None
                log.player.stop(t)
        elif kind == "seg":
            _, _, sid, turn, ms, text, *rest = ev
            s = session(sid, t)
            log = turn_of(s, turn, "segment", rest[0] if rest else None)
            if log is not None:
                if log.t_started is None:
                    sanity.fail("segment_before_turn_started", f"session {sid} turn {turn}")
                log.segments.append((t, ms, text))
        elif kind == "w":
            _, _, sid, turn, n, first_ms, estimated, ctx = ev
            log = turn_of(session(sid, t), turn, "words", ctx)
            if log is not None:
                timing.on_words(sanity, log, n, first_ms, estimated)
        elif kind == "v":
            _, _, sid, turn, n, ctx = ev
            log = turn_of(session(sid, t), turn, "visemes", ctx)
            if log is not None:
                timing.on_visemes(sanity, log, n)
        elif kind == "ts":
            _, _, sid, turn, speaker, *rest = ev
            ctx = rest[0] if rest else None
            s = session(sid, t)
            cur = s.current.get(ctx)
            if cur is None or cur.k != turn:
                where = "" if ctx is None else f" of context {ctx!r}"
                sanity.fail("turn_numbering", f"session {sid}: turn.started {turn}{where} during client turn {cur.k if cur else None}")
                continue
            if not cur.sends:
                sanity.fail("turn_started_before_text", f"session {sid} turn {turn}")
            if cur.t_started is not None:
                sanity.fail("turn_started_twice", f"session {sid} turn {turn}")
            if speaker != cur.speaker:
                sanity.fail("turn_speaker", f"session {sid} turn {turn}: speaker {speaker}, sent {cur.speaker}")
            cur.t_started = t
        elif kind == "done":
            _, _, sid, turn, reason, audio_ms, frames, _ttfa, underruns, underrun_ms, *rest = ev
            s = session(sid, t)
            log = turn_of(s, turn, "turn.done", rest[0] if rest else None)
            if log is None:
                continue
            if log.done is not None:
                sanity.fail("done_twice", f"session {sid} turn {turn}")
            received = len(log.audio) + log.audio_after_cancel
            if frames != received and not (log.t_cancel is not None and frames > received) and one_socket:
                sanity.fail("done_frames", f"session {sid} turn {turn}: turn.done says {frames}, received {received}")
            if abs(audio_ms - frames * s.frame_ms) > 0.5 * max(1, frames) ** 0.5:
                sanity.fail("done_audio_ms", f"session {sid} turn {turn}: {audio_ms} ms for {frames} frames")
            if reason == "complete" and not any(w == "turn.end" for _, w, _ in log.sends):
                sanity.fail("complete_without_turn_end", f"session {sid} turn {turn}")
            if reason == "cancelled" and log.t_cancel is None and one_socket:  # a cancel stops its own context's turn
                sanity.fail("cancelled_without_cancel", f"session {sid} turn {turn} (context {log.context!r})")
            assert log.player is not None
            if underruns != log.player.underruns or abs(underrun_ms - log.player.underrun_ms) > 0.01:
                sanity.fail(
                    "player_replay",
                    f"session {sid} turn {turn}: live {underruns}/{underrun_ms} ms, replay "
                    f"{log.player.underruns}/{log.player.underrun_ms:.3f} ms",
                )
            log.done = list(ev)
            ttfa = log.ttfa_ms
            if ttfa is not None and ttfa < 0:
                sanity.fail("audio_before_text", f"session {sid} turn {turn}: first audio {-ttfa:.3f} ms before its text")
        elif kind == "turn":
            _, _, sid, k, speaker, text, barge, *rest = ev
            ctx = rest[0] if rest else None
            s = session(sid, t)
            if s.t_ready is None:
                sanity.fail("turn_before_ready", f"session {sid} turn {k}")
            if ctx not in context_ids:
                sanity.fail("turn_context", f"session {sid} turn {k}: context {ctx!r}, the run has {sorted(map(str, context_ids))}")
            if k != len(s.turns):  # the client numbers a session's turns 0, 1, 2, ... as they begin
                sanity.fail("turn_index", f"session {sid}: turn {k} began as the session's turn {len(s.turns)}")
            prev = s.current.get(ctx)
            if prev is not None and prev.done is None and s.t_close is None:
                where = "" if ctx is None else f" in context {ctx!r}"
                sanity.fail("turn_overlap", f"session {sid}: turn {k} began before turn {prev.k} was done{where}")
            in_flight = sum(1 for c, other in s.current.items() if c != ctx and other.done is None)
            if in_flight >= n_contexts and s.t_close is None:
                sanity.fail("contexts_exceeded", f"session {sid}: turn {k} began with {in_flight} other turns in flight")
            log = TurnLog(sid, k, t, speaker, text, barge, player=Player(prebuffer), context=ctx, others=in_flight)
            if ctx not in s.current:
                log.rank = len(s.current)
            s.turns[k] = log
            s.current[ctx] = log
        elif kind in CALL_EVENTS:
            s = session(ev[2], t)
            calls.on_event(ev)
            log = s.turns.get(ev[3]) if kind == "clear" and ev[3] is not None else None
            if log is not None and log.t_cancel is None:  # the call dropped the turn's audio: its barge-in
                log.t_cancel = t
                assert log.player is not None
                log.player.stop(t)
        elif kind == "ping":
            session(ev[2], t)
            pings.append((t, float(ev[3])))
        elif kind == "floor":
            floor.append((t, float(ev[3])))
        elif kind == "cpu":
            cpu.append(list(ev[1:]))
        elif kind == "lag":
            lag.append((t, float(ev[2])))
        elif kind == "err":
            _, _, sid, code, _message, fatal = ev
            errors[str(code)] += 1
            fatal_errors += bool(fatal)
        elif kind == "conn":
            session(ev[2], t).t_conn = t
        elif kind == "open":
            s = session(ev[2], t)
            if s.t_conn is None:
                sanity.fail("open_before_connect", f"session {s.sid}")
            s.t_open = t
            opens.append(t)
        elif kind == "ready":
            s = session(ev[2], t)
            if s.t_open is None:
                sanity.fail("ready_before_open", f"session {s.sid}")
            s.t_ready = t
            s.frame_ms = float(ev[3])
        elif kind == "close":
            s = session(ev[2], t)
            s.t_close, s.close_why = t, str(ev[3])
            if s.t_open is not None:
                closes.append(t)
        else:
            sanity.fail("unknown_event", repr(kind))

    # concurrency: sessions open at each moment
    opens.sort()
    closes.sort()

    def open_at(t: float) -> int:
        return bisect.bisect_right(opens, t) - bisect.bisect_right(closes, t)

    all_turns = [log for s in sessions.values() for log in s.turns.values()]
    for log in all_turns:
        log.concurrency = open_at(log.t_start)
    measured = [log for log in all_turns if measure_from <= log.t_start <= duration]
    window_end = max([duration] + [log.audio[-1] for log in measured if log.audio])
    window_s = max(1e-9, window_end - measure_from)

    ttfa = [v for log in measured if (v := log.ttfa_ms) is not None]
    server_ttfa = [float(log.done[7]) for log in measured if log.done is not None and log.done[7] is not None]
    gaps: list[float] = []
    rtf: list[float] = []
    cancel_ms: list[float] = []
    after_cancel_ms: list[float] = []  # cancel -> the last audio of the cancelled turn
    after_cancel_packets = 0
    underrun_count = 0
    underrun_ms = 0.0
    turns_with_underruns = 0
    audio_s_measured = 0.0
    frame_of = {sid: s.frame_ms for sid, s in sessions.items()}
    for log in measured:
        if len(log.audio) > 1:
            gaps.extend((np.diff(log.audio) * 1000.0).tolist())
        assert log.player is not None
        underrun_count += log.player.underruns
        underrun_ms += log.player.underrun_ms
        turns_with_underruns += log.player.underruns > 0
        audio_ms = len(log.audio) * frame_of[log.sid]
        audio_s_measured += audio_ms / 1000.0
        ready = log.t_ready
        if log.reason == "complete" and ready is not None and log.audio and audio_ms > 0:
            rtf.append((log.audio[-1] - ready) * 1000.0 / audio_ms)
        if log.t_cancel is not None and log.done is not None:
            if log.cancel_sent:  # (a call's clear and its turn.done come on two sockets: no order between them)
                cancel_ms.append((float(log.done[1]) - log.t_cancel) * 1000.0)
            after_cancel_packets += log.audio_after_cancel
            if log.t_last_after_cancel is not None:
                after_cancel_ms.append((log.t_last_after_cancel - log.t_cancel) * 1000.0)
    audio_s_total = sum(len(log.audio) * frame_of[log.sid] for log in all_turns) / 1000.0

    unmatched = sum(1 for log in measured if log.audio and log.t_ready is None)
    if unmatched:
        sanity.fail("ttfa_unmatched", f"{unmatched} turns whose first segment could not be found in the text sent")
    unfinished = sum(1 for log in measured if log.done is None)

    floor_m = [rtt for t, rtt in floor if measure_from <= t <= duration]
    ping_m = [rtt for t, rtt in pings if measure_from <= t <= duration]
    lag_m = [ms for t, ms in lag if measure_from <= t <= duration]
    cpu_m = [row for row in cpu if measure_from <= row[0] <= duration]
    ttfa_d, floor_d = dist(ttfa), dist(floor_m)

    def overhead(q: str) -> float | None:
        a, b = ttfa_d[q], floor_d[q]
        return None if a is None or b is None else round(float(a) - float(b), 3)

    def cpu_col(i: int) -> dict[str, float | int | None]:
        return dist([row[i] for row in cpu_m if len(row) > i and row[i] is not None])

    server_cpu = [row[1] + (row[2] or 0.0) for row in cpu_m if row[1] is not None]
    # CPU used by anything else on the machine: a busy neighbour invalidates a capacity figure
    other = [max(0.0, row[4] - (row[1] or 0.0) - (row[2] or 0.0) - (row[3] or 0.0)) for row in cpu_m if row[4] is not None]
    other_d = dist(other)
    streams_mean = audio_s_measured / window_s
    reasons = Counter(log.reason for log in measured)
    n_ready = sum(1 for s in sessions.values() if s.t_ready is not None)
    client_cpu = cpu_col(3)
    client_max = cpu_col(8)  # the busiest load-generator process (runs before several have none: the one)
    busiest = client_max if client_max["mean"] is not None else client_cpu
    lag_d = dist(lag_m)
    client_saturated = bool(
        (busiest["mean"] is not None and float(busiest["mean"]) > 90.0)
        or (lag_d["p99"] is not None and float(lag_d["p99"]) > 20.0)
    )
    phone = calls.summary(
        (measure_from, window_end),
        {sid: {k: log.done[1] for k, log in s.turns.items() if log.done is not None and log.reason == "cancelled"}
         for sid, s in sessions.items()},
        float(np.mean(server_cpu)) if server_cpu else None,
        meta.get("vad_bench"),
    ) if telephony else None  # before the sanity is written: the calls have rules of their own
    gateway_cpu = [row[1] for row in cpu_m if row[1] is not None]
    total_per_stream = round(float(np.mean(server_cpu)) / streams_mean, 3) if server_cpu and streams_mean > 0 else None
    summary: dict[str, Any] = {
        "headline": _headline(gateway_cpu, total_per_stream, streams_mean, cpu_m, floor_d, client_cpu, meta),
        "sessions": int(config["sessions"]),
        "sessions_ready": n_ready,
        "turns": len(measured),
        "turns_total": len(all_turns),
        "turns_by_reason": dict(reasons),
        "turns_unfinished": unfinished,
        "ttfa_ms": ttfa_d,
        "gap_ms": dist(gaps),
        "underruns": underrun_count,
        "underrun_ms": round(underrun_ms, 3),
        "turns_with_underruns": turns_with_underruns,
        "errors": sum(errors.values()),
        "errors_by_code": dict(errors),
        "errors_fatal": fatal_errors,
        "audio_seconds": round(audio_s_total, 3),
        "audio_seconds_measured": round(audio_s_measured, 3),
        "streams_mean": round(streams_mean, 2),
        "streams_peak": _peak([iv for log in all_turns if (iv := log.playing(frame_of[log.sid])) is not None],
                              measure_from, window_end),
        "rtf": dist(rtf),
        "cancel_ms": dist(cancel_ms),
        "audio_after_cancel": {"packets": after_cancel_packets, "last_ms": dist(after_cancel_ms)},
        "server_ttfa_ms": dist(server_ttfa),
        "ping_ms": dist(ping_m),
        "floor_ms": floor_d,
        "overhead_ms": {"p50": overhead("p50"), "p90": overhead("p90"), "p99": overhead("p99")},
        "cpu": {
            "server": cpu_col(1),
            "server_children": cpu_col(2),
            "client": client_cpu,
            "system": cpu_col(4),
            "other": other_d,
            "server_wait": cpu_col(5),
            "client_wait": cpu_col(6),
            "server_per_stream": total_per_stream,
            "client_max": client_max,
        },
        "client_lag_ms": lag_d,
        "client_saturated": client_saturated,
        "machine_busy": _machine_busy(other_d, cpu_col(5), cpu_col(6)),
        "window_s": [round(measure_from, 3), round(window_end, 3)],
        "contexts": _contexts_summary(n_contexts, measured, sessions),
        "timing": timing.to_json(),
        **({"telephony": phone} if phone is not None else {}),
        "sanity": sanity.to_json(),
        "config": config,
        "machine": meta.get("machine"),
        "server": meta.get("server"),
        "client_processes": meta.get("client_processes"),
    }
    if ttfa_p99_ms is not None or max_underruns is not None:
        summary["thresholds"] = {"ttfa_p99_ms": ttfa_p99_ms, "max_underruns": max_underruns}
        summary["within_thresholds"] = within(summary, ttfa_p99_ms, max_underruns)
    return Analysis(
        summary=summary,
        turns=sorted(all_turns, key=lambda log: log.t_start),
        cpu=cpu,
        floor=floor,
        lag=lag,
        concurrency=[(t, open_at(t)) for t in sorted(opens + closes)],
    )


def _headline(gateway_cpu: list[float], total_per_stream: float | None, streams: float, cpu_m: list[list[Any]],
              floor: dict[str, Any], client_cpu: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The run in one line: server CPU per stream (% of one core per concurrently playing stream: the gateway
    processes' mean CPU over the measured window / the mean concurrent streams), beside the floor (the bare
    WebSocket round trip of the same run; and ``codec_floor_pct``, what the codec alone costs per stream, when
    meta.json has it)."""
    gateway = float(np.mean(gateway_cpu)) if gateway_cpu else None
    gateways = [int(row[7]) for row in cpu_m if len(row) > 7 and row[7] is not None]
    out: dict[str, Any] = {
        "server_cpu_per_stream": round(gateway / streams, 3) if gateway is not None and streams > 0 else None,
        "server_cpu_per_stream_with_children": total_per_stream,
        "streams": round(streams, 2),
        "server_cpu": None if gateway is None else round(gateway, 1),
        "gateway_processes": max(gateways) if gateways else (1 if gateway_cpu else None),
        "client_processes": len(meta.get("client_processes") or [None]),
        "client_cpu_per_stream": (
            round(float(client_cpu["mean"]) / streams, 3) if client_cpu["mean"] is not None and streams > 0 else None
        ),
        "floor_ms_p50": floor["p50"],
    }
    if meta.get("codec_floor_pct") is not None:
        out["codec_floor_pct"] = meta["codec_floor_pct"]
    return out


def _peak(intervals: list[tuple[float, float]], lo: float = -math.inf, hi: float = math.inf) -> int:
    """The most intervals open at once within [lo, hi] (an interval ending as another starts does not overlap it)."""
    edges = sorted([(max(a, lo), 1) for a, b in intervals if b > lo and a < hi and b > a]
                   + [(min(b, hi), -1) for a, b in intervals if b > lo and a < hi and b > a])
    peak = n = 0
    for _, step in edges:  # at equal times -1 sorts first
        n += step
        peak = max(peak, n)
    return peak


def _key(ctx: str | None) -> str:
    return "default" if ctx is None else ctx


def _contexts_summary(n_contexts: int, measured: list[TurnLog], sessions: dict[int, _SessionLog]) -> dict[str, Any]:
    """Per-context numbers: TTFA by context, alone vs with the session's other contexts in flight, the first round."""

    def ttfa(logs: list[TurnLog]) -> list[float]:
        return [v for log in logs if (v := log.ttfa_ms) is not None]

    by_context: dict[str, Any] = {}
    for ctx in sorted({log.context for log in measured}, key=lambda c: (c is not None, len(c or ""), c or "")):
        logs = [log for log in measured if log.context == ctx]
        frame = {log.sid: sessions[log.sid].frame_ms for log in logs}
        by_context[_key(ctx)] = {
            "turns": len(logs),
            "turns_by_reason": dict(Counter(log.reason for log in logs)),
            "ttfa_ms": dist(ttfa(logs)),
            "audio_seconds": round(sum(len(log.audio) * frame[log.sid] for log in logs) / 1000.0, 3),
            "underruns": sum(log.player.underruns for log in logs if log.player is not None),
        }
    by_others: dict[str, Any] = {}
    for n in sorted({log.others for log in measured}):
        by_others[str(n)] = dist(ttfa([log for log in measured if log.others == n]))
    # the first round: every session's first turn of each context, sent together (warm-up included)
    by_rank: dict[int, list[float]] = {}
    ratios: list[float] = []
    interleaved = 0
    peak_in_session = 0
    for s in sessions.values():
        first = sorted((log for log in s.turns.values() if log.rank is not None), key=lambda log: log.rank or 0)
        for log in first:
            if (v := log.ttfa_ms) is not None:
                by_rank.setdefault(log.rank or 0, []).append(v)
        base = first[0].ttfa_ms if first else None
        if base is not None and base > 0:
            ratios += [v / base for log in first[1:] if (v := log.ttfa_ms) is not None]
        spans = [(log.audio[0], log.audio[-1], log.context) for log in s.turns.values() if len(log.audio) > 1]
        interleaved += sum(
            1 for a0, a1, ca in spans if any(cb != ca and a0 < b1 and b0 < a1 for b0, b1, cb in spans)
        )
        frame_ms = s.frame_ms
        peak_in_session = max(peak_in_session, _peak(
            [iv for log in s.turns.values() if (iv := log.playing(frame_ms)) is not None]))
    alone = [log for log in measured if log.others == 0]
    together = [log for log in measured if log.others > 0]
    alone_d, together_d = dist(ttfa(alone)), dist(ttfa(together))
    return {
        "per_session": n_contexts,
        "by_context": by_context,
        "ttfa_ms_alone": alone_d,
        "ttfa_ms_with_others": together_d,
        "with_others_over_alone_p50": (
            round(float(together_d["p50"]) / float(alone_d["p50"]), 3)
            if together_d["p50"] is not None and alone_d["p50"] else None
        ),
        "ttfa_ms_by_others": by_others,
        "first_round": {
            "ttfa_ms_by_rank": {str(r): dist(v) for r, v in sorted(by_rank.items())},
            "later_over_first": dist(ratios),
        },
        "interleaved_turns": interleaved,
        "streams_peak_in_session": peak_in_session,
    }


def _machine_busy(other: dict[str, Any], server_wait: dict[str, Any], client_wait: dict[str, Any]) -> bool:
    """Other processes used the CPU and the server or the client had to wait for it: not a valid measurement."""
    if other["mean"] is None or float(other["mean"]) <= 20.0:
        return False
    waits = [d["mean"] for d in (server_wait, client_wait) if d["mean"] is not None]
    return not waits or max(waits) > 3.0


def within(summary: dict[str, Any], ttfa_p99_ms: float | None, max_underruns: int | None) -> bool:
    """Does a run meet the thresholds? Also requires every session ready, no error, no unfinished turn, sane, and
    (telephony) every call joined and no barge-in missed."""
    ok = summary["sanity"]["ok"] and summary["errors"] == 0 and summary["turns_unfinished"] == 0
    phone = summary.get("telephony")
    if phone is not None:
        ok = ok and phone["joined"] == summary["sessions"] and phone["barge_ins"]["missed"] == 0
    ok = ok and summary["sessions_ready"] == summary["sessions"] and summary["turns"] > 0
    p99 = summary["ttfa_ms"]["p99"]
    if ttfa_p99_ms is not None:
        ok = ok and p99 is not None and p99 <= ttfa_p99_ms
    if max_underruns is not None:
        ok = ok and summary["underruns"] <= max_underruns
    return bool(ok)


def write_turns_csv(path: Path, turns: list[TurnLog]) -> None:
    """One row per turn, for anyone who wants to look further."""
    lines = ["session,turn,t_start,concurrency,reason,ttfa_ms,server_ttfa_ms,audio_packets,underruns,underrun_ms,"
             "context,others"]
    for log in turns:
        ttfa = log.ttfa_ms
        server = log.done[7] if log.done is not None else None
        assert log.player is not None
        lines.append(
            f"{log.sid},{log.k},{log.t_start:.4f},{log.concurrency},{log.reason},"
            f"{'' if ttfa is None else f'{ttfa:.3f}'},{'' if server is None else server},{len(log.audio)},"
            f"{log.player.underruns},{log.player.underrun_ms:.3f},{'' if log.context is None else log.context},{log.others}"
        )
    path.write_text("\n".join(lines) + "\n")
