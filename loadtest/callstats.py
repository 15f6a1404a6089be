"""Telephony statistics (``--telephony``): the phone lines' events, beside :mod:`loadtest.stats`' turns.

The turns of a telephony run are analysed like any other (their audio is what the call played, so TTFA, gaps and
underruns are the call's); this module adds what only calls have. Definitions, on the load-test client's clock:

- onset to clear: from the moment the caller's utterance starts sounding (its first frame sent, ``utt``, plus the
  utterance's onset) to the first ``clear`` of the same turn the line receives after that frame, within
  ``MATCH_S``. An utterance with no such clear is *missed* (the caller spoke over a playing turn and it went on); a
  clear with no utterance over its turn in the ``MATCH_S`` before it is *spurious* (the voice activity fired on a
  quiet line).
- VAD onset error: ``input.speech_started.ms`` minus where the utterance started sounding on the input clock (its
  first frame's position, 20 ms per frame sent since the call joined, plus the onset): how early (negative) or late
  the server placed the caller's onset, which is where it cuts the turn.
- server CPU per call: the server's mean CPU in the measured window (gateway and children, 100 = one core) over
  the calls joined; the VAD's share comes from the in-process benchmark (:func:`loadtest.caller.vad_cost`), whose
  result the run keeps in ``meta.json``.

Utterances and clears count when they happen in the measured window (after the ramp and the warm-up).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CALL_EVENTS = frozenset({"call", "joined", "utt", "clear", "vad", "hungup", "line"})
MATCH_S = 3.0  # an utterance and the clear it caused are at most this far apart


@dataclass
class _Line:
    t_call: float | None = None  # the Media Stream opened
    t_joined: float | None = None  # call.started reached the application
    hangup: str | None = None  # call.stopped's reason
    t_hangup: float = math.inf  # ... and when it came
    utterances: list[tuple[float, int | None, float, float]] = field(default_factory=list)  # t, turn, onset, clock ms
    clears: list[tuple[float, int | None]] = field(default_factory=list)  # t, turn
    started: list[tuple[float, float]] = field(default_factory=list)  # input.speech_started: t, ms
    stopped: int = 0
    frames: int = 0  # the caller's frames sent
    relayed: int = 0  # ... relayed back to the application
    marks_echoed: int = 0


class Calls:
    """Collects the call events (``CALL_EVENTS``) of a run, then sums them up."""

    def __init__(self, fail: Callable[[str, str], None]) -> None:
        self.fail = fail  # the statistics step's sanity check: (rule, detail)
        self.lines: dict[int, _Line] = {}

    def on_event(self, ev: list[Any]) -> None:
        kind, t, sid = ev[0], ev[1], ev[2]
        line = self.lines.setdefault(sid, _Line())
        if kind == "call":
            line.t_call = t
        elif kind == "joined":
            if line.t_call is None:
                self.fail("joined_before_call", f"session {sid}: call.started before the Media Stream opened")
            line.t_joined = t
        elif kind == "utt":
            if line.t_joined is None:
                self.fail("speech_before_joined", f"session {sid}: the caller spoke before the call joined")
            line.utterances.append((t, ev[3], float(ev[4]), float(ev[5])))
        elif kind == "clear":
            line.clears.append((t, ev[3]))
        elif kind == "vad":
            if ev[3] == "started":
                line.started.append((t, float(ev[4])))
            else:
                line.stopped += 1
        elif kind == "hungup":
            line.hangup, line.t_hangup = str(ev[3]), t
        elif kind == "line":
            line.frames, line.relayed, line.marks_echoed = int(ev[3]), int(ev[4]), int(ev[5])
            if line.relayed > line.frames:
                self.fail("relayed_unsent", f"session {sid}: {line.relayed} frames relayed, {line.frames} sent")

    def summary(self, window: tuple[float, float], cancelled: dict[int, dict[int, float]], server_cpu: float | None,
                vad: dict[str, Any] | None) -> dict[str, Any]:
        """``window``: the measured window; ``cancelled``: session -> {turn: when its turn.done came} for the turns
        that ended cancelled (each one cancelled while its call was joined must have been cleared on the call: the
        server cancels a turn in flight also when the call leaves); ``server_cpu``: the server's mean CPU in the
        window; ``vad``: the benchmark's result."""
        from loadtest.stats import dist

        lo, hi = window
        latency: list[float] = []
        onset_error: list[float] = []
        utterances = missed = spurious = 0
        for sid, line in sorted(self.lines.items()):
            for t_utt, turn, onset, clock_ms in line.utterances:
                t_clear = next((t for t, k in line.clears if k == turn and t_utt <= t <= t_utt + MATCH_S), None)
                started = [ms for t, ms in line.started if t >= t_utt]
                if started and started[0] - (clock_ms + onset) < MATCH_S * 1000.0:
                    onset_error.append(started[0] - (clock_ms + onset))
                if not lo <= t_utt <= hi:
                    continue
                utterances += 1
                if t_clear is not None:
                    latency.append((t_clear - t_utt) * 1000.0 - onset)
                else:
                    missed += 1
            for t_clear, turn in line.clears:
                if lo <= t_clear <= hi and not any(k == turn and t <= t_clear <= t + MATCH_S
                                                   for t, k, *_ in line.utterances):
                    spurious += 1
            cleared_turns = {k for _, k in line.clears}
            uncleared = [k for k, t in cancelled.get(sid, {}).items() if k not in cleared_turns and t < line.t_hangup]
            for k in sorted(uncleared):
                self.fail("cancelled_without_clear", f"session {sid} turn {k}: cancelled, and the call never cleared")
        joined = sum(1 for line in self.lines.values() if line.t_joined is not None)
        return {
            "calls": sum(1 for line in self.lines.values() if line.t_call is not None),
            "joined": joined,
            "hangups": dict(Counter(line.hangup for line in self.lines.values() if line.hangup is not None)),
            "barge_ins": {"utterances": utterances, "cleared": utterances - missed, "missed": missed,
                          "spurious_clears": spurious},
            "onset_to_clear_ms": dist(latency),
            "vad_onset_error_ms": dist(onset_error),
            "speech_started": sum(len(line.started) for line in self.lines.values()),
            "speech_stopped": sum(line.stopped for line in self.lines.values()),
            "caller_frames": sum(line.frames for line in self.lines.values()),
            "relayed_frames": sum(line.relayed for line in self.lines.values()),
            "marks_echoed": sum(line.marks_echoed for line in self.lines.values()),
            "server_cpu_per_call": round(server_cpu / joined, 3) if server_cpu is not None and joined else None,
            "vad": vad,
        }
