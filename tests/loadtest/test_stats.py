"""The statistics step on hand-made raw events: definitions, warm-up, and the sanity check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest.config import SwarmConfig
from loadtest.record import EVENTS_FILE, META_FILE, Recorder
from loadtest.stats import analyse, dist

TEXT = "Hello there. How are you?"
TOKENS = ["Hello", " there.", " How", " are", " you?"]


def write_raw(tmp: Path, events: list[list[Any]], **config: Any) -> Path:
    raw = tmp / "raw"
    raw.mkdir()
    cfg = SwarmConfig(url="ws://127.0.0.1:9/v1/realtime", **{"sessions": 1, "ramp_s": 0.0, "warmup_s": 0.0, "duration_s": 30.0, **config})
    (raw / META_FILE).write_text(json.dumps({"config": cfg.to_json(), "machine": {}, "server": {}}))
    rec = Recorder(raw / EVENTS_FILE)
    for ev in events:
        rec.event(*ev)
    rec.close()
    return raw


def turn_events(sid: int, k: int, t0: float, *, packets: int = 10, first_audio: float = 0.05, spacing: float = 0.01,
                done: bool = True, underruns: int = 0, underrun_ms: float = 0.0) -> list[list[Any]]:
    """One well-formed turn: text sent token by token every 10 ms from t0, audio from t0 + first_audio."""
    ev: list[list[Any]] = [["turn", t0, sid, k, 0, TEXT, None]]
    chars = 0
    for i, tok in enumerate(TOKENS):
        chars += len(tok)
        ev.append(["send", t0 + 0.001 + i * 0.01, sid, k, "text", chars])
        if i == 0:
            ev.append(["ts", t0 + 0.002, sid, k, 0])
    ev.append(["send", t0 + 0.045, sid, k, "turn.end", chars])
    # the first segment "Hello there." is cut when " How" arrives (sent at t0 + 0.021)
    ev.append(["seg", t0 + first_audio - 0.0005, sid, k, 0.0, "Hello there."])
    for seq in range(packets):
        ev.append(["a", t0 + first_audio + seq * spacing, sid, k, seq, seq * 20.0, 60])
    if done:
        ev.append(["done", t0 + first_audio + packets * spacing, sid, k, "complete", packets * 20.0, packets, 1.0,
                   underruns, underrun_ms])
    return ev


def session(sid: int, t0: float = 0.0) -> list[list[Any]]:
    return [["conn", t0, sid], ["open", t0 + 0.001, sid], ["ready", t0 + 0.002, sid, 20.0, "opus"]]


def test_ttfa_runs_from_the_message_that_completes_the_first_segment(tmp_path: Path) -> None:
    events = session(0) + turn_events(0, 0, 1.0, first_audio=0.050) + [["close", 2.0, 0, "done"]]
    a = analyse(write_raw(tmp_path, events))
    s = a.summary
    assert s["sanity"]["ok"], s["sanity"]
    assert s["turns"] == 1 and s["turns_by_reason"] == {"complete": 1}
    # " How" (the first token past "Hello there.") was sent at 1.021; the first audio came at 1.050
    assert s["ttfa_ms"]["p50"] == pytest.approx(29.0)
    assert s["gap_ms"]["p50"] == pytest.approx(10.0) and s["gap_ms"]["n"] == 9
    assert s["underruns"] == 0 and s["errors"] == 0
    assert s["audio_seconds"] == pytest.approx(0.2)
    assert s["sessions"] == 1 and s["sessions_ready"] == 1


def test_warm_up_turns_are_excluded_but_their_errors_count(tmp_path: Path) -> None:
    events = (
        session(0)
        + turn_events(0, 0, 1.0, first_audio=0.5)  # warm-up: a slow first turn
        + [["err", 1.6, 0, "internal", "boom", False]]
        + turn_events(0, 1, 5.0, first_audio=0.05)
        + [["close", 6.0, 0, "done"]]
    )
    s = analyse(write_raw(tmp_path, events, ramp_s=2.0, warmup_s=1.0)).summary
    assert s["turns"] == 1 and s["turns_total"] == 2
    assert s["ttfa_ms"]["max"] == pytest.approx(29.0)
    assert s["errors"] == 1 and s["errors_by_code"] == {"internal": 1}


def test_underruns_are_replayed_from_arrivals_and_must_match_the_live_player(tmp_path: Path) -> None:
    # 20 ms packets every 30 ms with a 40 ms jitter buffer: the buffer runs dry again and again
    good = session(0) + turn_events(0, 0, 1.0, spacing=0.030, underruns=7, underrun_ms=60.0)
    s = analyse(write_raw(tmp_path, good)).summary
    assert s["sanity"]["ok"], s["sanity"]
    assert s["underruns"] == 7 and s["underrun_ms"] == pytest.approx(60.0)
    assert s["turns_with_underruns"] == 1

    lying = session(0) + turn_events(0, 0, 1.0, spacing=0.030, underruns=0, underrun_ms=0.0)
    other = tmp_path / "other"
    other.mkdir()
    s = analyse(write_raw(other, lying)).summary
    assert not s["sanity"]["ok"] and s["sanity"]["violations"] == {"player_replay": 1}


def _ts_first(ev: list[list[Any]]) -> list[list[Any]]:
    """turn.started recorded before the client sent any text of the turn."""
    rest = [e for e in ev if e[0] != "ts"]
    i = next(i for i, e in enumerate(rest) if e[0] == "turn") + 1
    return rest[:i] + [["ts", rest[i - 1][1], 0, 0, 0]] + rest[i:]


@pytest.mark.parametrize(
    ("mutate", "rule"),
    [
        (lambda ev: [e for e in ev if not (e[0] == "a" and e[4] == 3)], "audio_seq"),  # a lost packet
        (lambda ev: ev + [["a", 9.0, 0, 0, 10, 200.0, 60]], "audio_after_done"),
        (lambda ev: [e for e in ev if e[0] != "ts"], "audio_before_turn_started"),
        (lambda ev: [e for e in ev if e[0] != "ready"], "turn_before_ready"),
        (lambda ev: _ts_first(ev), "turn_started_before_text"),
        (lambda ev: [["a", *e[1:5], e[4] * 25.0, 60] if e[0] == "a" else e for e in ev], "audio_ms"),
        (lambda ev: [[*e[:6], e[6] + 1, *e[7:]] if e[0] == "done" else e for e in ev], "done_frames"),
        (lambda ev: ev[:5] + [["a", 0.5, 0, 7, 0, 0.0, 60]] + ev[5:], "unknown_turn"),
    ],
)
def test_impossible_orderings_are_rejected(tmp_path: Path, mutate: Any, rule: str) -> None:
    events = mutate(session(0) + turn_events(0, 0, 1.0))
    s = analyse(write_raw(tmp_path, events)).summary
    assert not s["sanity"]["ok"]
    assert rule in s["sanity"]["violations"], s["sanity"]


def test_floor_overhead_and_concurrency(tmp_path: Path) -> None:
    events = session(0) + session(1, 0.5)
    events += turn_events(0, 0, 1.0) + turn_events(1, 0, 1.2)
    events += [["floor", 1.0 + i / 100, i % 2, 1.0 + (i % 10) / 10] for i in range(100)]
    events += [["cpu", 1.5, 50.0, 5.0, 20.0, 80.0], ["cpu", 2.0, 70.0, 5.0, 20.0, 100.0]]
    events += [["close", 3.0, 0, "done"], ["close", 3.1, 1, "done"]]
    a = analyse(write_raw(tmp_path, sorted(events, key=lambda e: e[1]), sessions=2))
    s = a.summary
    assert s["sanity"]["ok"], s["sanity"]
    assert s["floor_ms"]["p50"] == pytest.approx(1.45)
    assert s["overhead_ms"]["p50"] == pytest.approx(29.0 - 1.45)
    assert [t.concurrency for t in a.turns] == [2, 2]
    assert s["cpu"]["server"]["mean"] == pytest.approx(60.0)
    assert s["cpu"]["other"]["mean"] == pytest.approx(5.0)


def test_dist_of_nothing_is_empty_not_an_error() -> None:
    assert dist([]) == {"p50": None, "p90": None, "p99": None, "max": None, "mean": None, "n": 0}
    d = dist(list(range(1, 101)))
    assert d["p50"] == pytest.approx(50.5) and d["max"] == 100 and d["n"] == 100


def test_a_barge_in_may_drop_queued_packets_but_not_reorder_them(tmp_path: Path) -> None:
    ev = session(0) + turn_events(0, 0, 1.0, packets=6, done=False)
    ev += [["send", 1.12, 0, 0, "cancel", 0], ["send", 1.121, 0, 0, "playback", 0]]
    ev += [["a", 1.125, 0, 0, 8, 160.0, 60]]  # 6 and 7 were dropped from the server's queue; 8 was in flight
    ev += [["done", 1.13, 0, 0, "cancelled", 180.0, 9, 1.0, 0, 0.0]]
    s = analyse(write_raw(tmp_path, ev)).summary
    assert s["sanity"]["ok"], s["sanity"]
    assert s["turns_by_reason"] == {"cancelled": 1}
    assert s["cancel_ms"]["p50"] == pytest.approx(10.0)
    assert s["audio_after_cancel"]["packets"] == 1
    assert s["audio_after_cancel"]["last_ms"]["max"] == pytest.approx(5.0)

    backwards = tmp_path / "backwards"
    backwards.mkdir()
    ev2 = [e if e[:1] != ["a"] or e[1] != 1.125 else ["a", 1.125, 0, 0, 5, 100.0, 60] for e in ev]
    s = analyse(write_raw(backwards, ev2)).summary
    assert s["sanity"]["violations"].get("audio_seq") == 1
