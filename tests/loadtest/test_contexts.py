"""``--contexts N`` without a server: plans per context, the client's framing and routing, the statistics step's
per-context numbers and its per-context ordering checks."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import msgpack
import pytest

from loadtest.client import Live, SimSession, TurnState, frame
from loadtest.config import SwarmConfig
from loadtest.player import Player
from loadtest.record import Recorder, read_events
from loadtest.script import session_speakers, turn_plan
from loadtest.stats import analyse
from realtime.protocol import Cancel, Encoding, Playback, Text, TurnEnd, encode
from tests.loadtest.test_stats import TEXT, TOKENS, session, write_raw

URL = "ws://127.0.0.1:9/v1/realtime"


# ---------------------------------------------------------------------------------------------- plans


def test_one_context_plans_are_exactly_those_of_before_contexts() -> None:
    config = SwarmConfig(url=URL, barge_in=0.3, sentences=(1, 4), speaker_change=0.5, seed=3)
    plans = [turn_plan(config, s, k) for s in range(20) for k in range(30)]
    assert all(p.context is None for p in plans)
    fields = repr([(p.index, p.speaker, p.pieces, p.barge_after_ms, p.think_s) for p in plans])
    # the digest of these plans computed before --contexts existed
    assert hashlib.sha1(fields.encode()).hexdigest() == "609fe990aff75d4f59992510fd20ba0a16b36070"
    assert session_speakers(config) == 2


def test_each_context_has_its_own_speaker_and_script() -> None:
    config = SwarmConfig(url=URL, contexts=3, sentences=(2, 3), speaker_change=1.0, barge_in=0.5, seed=5)
    assert config.context_ids == ("c0", "c1", "c2") and session_speakers(config) == 3
    for c in range(3):
        plans = [turn_plan(config, 4, k, c) for k in range(8)]
        assert {p.context for p in plans} == {f"c{c}"}
        assert {piece.speaker for p in plans for piece in p.pieces} == {c}  # no in-turn speaker change
        assert [p.index for p in plans] == list(range(8))
        assert plans == [turn_plan(config, 4, k, c) for k in range(8)]  # deterministic
    scripts = [[turn_plan(config, 4, k, c).text for k in range(8)] for c in range(3)]
    assert scripts[0] != scripts[1] != scripts[2]
    with pytest.raises(ValueError):
        turn_plan(config, 0, 0, 3)


def test_contexts_are_validated_and_many_share_the_sixteen_speakers() -> None:
    for bad in (0, 65, True, 1.5):
        with pytest.raises(ValueError):
            SwarmConfig(url=URL, contexts=bad)  # type: ignore[arg-type]
    config = SwarmConfig(url=URL, contexts=20)
    assert session_speakers(config) == 16
    assert turn_plan(config, 0, 0, 17).speaker == 1
    assert SwarmConfig(url=URL).context_ids == (None,)
    assert SwarmConfig(url=URL, contexts=2).to_json()["contexts"] == 2


# ---------------------------------------------------------------------------------------------- client


def test_frames_carry_the_context_only_when_there_is_one() -> None:
    for msg in (Text(text=" hi", speaker=1), TurnEnd(), Cancel(), Playback(turn=3, played_ms=120.5)):
        assert frame(msg) == encode(msg, Encoding.MSGPACK)  # one context: the same bytes as before
        wire = msgpack.unpackb(frame(msg, "c1"), raw=False)
        assert wire["context"] == "c1" and wire["type"] == msg.type
        assert {k: v for k, v in wire.items() if k != "context"} == msgpack.unpackb(encode(msg, Encoding.MSGPACK), raw=False)


def test_the_reader_routes_interleaved_messages_to_each_contexts_turn(tmp_path: Path) -> None:
    config = SwarmConfig(url=URL, contexts=2, prebuffer_ms=0.0)
    rec = Recorder(tmp_path / "events.msgpack")

    async def scenario() -> tuple[SimSession, dict[str, TurnState]]:
        sim = SimSession(0, config, rec, Live(), hard_stop=60.0)
        states = {}
        for k, ctx in enumerate(("c0", "c1")):
            plan = turn_plan(config, 0, 0, k)
            states[ctx] = sim.current[ctx] = TurnState(plan, Player(0.0), k=k)
        sim._on_message(0.10, {"type": "turn.started", "turn": 0, "speaker": 0, "context": "c0"})
        sim._on_message(0.11, {"type": "turn.started", "turn": 1, "speaker": 1, "context": "c1"})
        for i in range(6):  # interleaved: c0, c1, c0, c1, ...
            turn = i % 2
            sim._on_message(0.12 + i * 0.01, {"type": "audio", "turn": turn, "seq": i // 2, "ms": (i // 2) * 20.0,
                                              "data": b"x", "context": f"c{turn}"})
        sim._on_message(0.20, {"type": "turn.done", "turn": 1, "reason": "complete", "audio_ms": 60.0, "frames": 3,
                               "ttfa_ms": 1.0, "context": "c1"})
        return sim, states

    sim, states = asyncio.run(scenario())
    rec.close()
    assert states["c0"].server_turn == 0 and states["c1"].server_turn == 1
    assert states["c0"].player.received_ms == 60.0 and states["c1"].player.received_ms == 60.0
    assert states["c1"].done.is_set() and not states["c0"].done.is_set()
    assert states["c0"].first_audio.is_set() and states["c1"].first_audio.is_set()
    assert list(sim.by_turn) == [0]  # c1's turn is done
    events = list(read_events(tmp_path / "events.msgpack"))
    assert [(e[0], e[-1]) for e in events if e[0] in ("ts", "done")] == [("ts", "c0"), ("ts", "c1"), ("done", "c1")]
    assert [e[-1] for e in events if e[0] == "a"] == ["c0", "c1"] * 3


def test_a_turn_started_of_another_context_is_not_taken_for_this_one(tmp_path: Path) -> None:
    """A server that ignores `context` answers every turn in the default context: the client binds nothing."""
    config = SwarmConfig(url=URL, contexts=2)
    rec = Recorder(tmp_path / "events.msgpack")

    async def scenario() -> TurnState:
        sim = SimSession(0, config, rec, Live(), hard_stop=60.0)
        state = sim.current["c0"] = TurnState(turn_plan(config, 0, 0, 0), Player(0.0), k=0)
        sim._on_message(0.1, {"type": "turn.started", "turn": 0, "speaker": 0})
        sim._on_message(0.2, {"type": "audio", "turn": 0, "seq": 0, "ms": 0.0, "data": b"x"})
        return state

    state = asyncio.run(scenario())
    rec.close()
    assert state.server_turn is None and state.player.received_ms == 0.0


# ---------------------------------------------------------------------------------------------- statistics


def ctx_turn(sid: int, k: int, t0: float, ctx: str | None, *, speaker: int = 0, first_audio: float = 0.05,
             packets: int = 10, spacing: float = 0.02, done: bool = True) -> list[list[Any]]:
    """One well-formed turn of a context (like test_stats.turn_events, with the context on every event)."""
    ev: list[list[Any]] = [["turn", t0, sid, k, speaker, TEXT, None, ctx]]
    chars = 0
    for i, tok in enumerate(TOKENS):
        chars += len(tok)
        ev.append(["send", t0 + i * 0.01, sid, k, "text", chars])
        if i == 0:
            ev.append(["ts", t0 + 0.002, sid, k, speaker, ctx])
    ev.append(["send", t0 + 0.045, sid, k, "turn.end", chars])
    ev.append(["seg", t0 + first_audio - 0.0005, sid, k, 0.0, "Hello there.", ctx])
    for seq in range(packets):
        ev.append(["a", t0 + first_audio + seq * spacing, sid, k, seq, seq * 20.0, 60, ctx])
    if done:
        ev.append(["done", t0 + first_audio + packets * spacing, sid, k, "complete", packets * 20.0, packets, 1.0,
                   0, 0.0, ctx])
    return ev


def two_contexts(sid: int = 0, t0: float = 1.0) -> list[list[Any]]:
    """c0 and c1 begin 1 ms apart and play at once (c1's first audio later); then c0 alone."""
    ev = session(sid) + ctx_turn(sid, 0, t0, "c0", first_audio=0.030)
    ev += ctx_turn(sid, 1, t0 + 0.001, "c1", speaker=1, first_audio=0.045)
    ev += ctx_turn(sid, 2, t0 + 1.0, "c0", first_audio=0.030)
    return sorted(ev, key=lambda e: e[1])


def test_two_contexts_give_per_context_ttfa_first_round_and_interleaving(tmp_path: Path) -> None:
    a = analyse(write_raw(tmp_path, two_contexts() + [["close", 3.0, 0, "done"]], contexts=2))
    s, c = a.summary, a.summary["contexts"]
    assert s["sanity"]["ok"], s["sanity"]
    assert s["turns"] == 3 and s["turns_by_reason"] == {"complete": 3}
    assert c["per_session"] == 2
    assert c["by_context"]["c0"]["turns"] == 2 and c["by_context"]["c1"]["turns"] == 1
    # "Hello there." is cut when " How" goes out, 20 ms after the turn began
    assert c["by_context"]["c0"]["ttfa_ms"]["p50"] == pytest.approx(10.0)
    assert c["by_context"]["c1"]["ttfa_ms"]["p50"] == pytest.approx(25.0)
    assert c["by_context"]["c1"]["audio_seconds"] == pytest.approx(0.2)
    # c0 began alone (twice), c1 began with c0 in flight
    assert c["ttfa_ms_alone"]["n"] == 2 and c["ttfa_ms_with_others"]["n"] == 1
    assert c["ttfa_ms_by_others"]["1"]["p50"] == pytest.approx(25.0)
    assert c["with_others_over_alone_p50"] == pytest.approx(2.5)
    assert c["first_round"]["ttfa_ms_by_rank"]["0"]["p50"] == pytest.approx(10.0)
    assert c["first_round"]["ttfa_ms_by_rank"]["1"]["p50"] == pytest.approx(25.0)
    assert c["first_round"]["later_over_first"]["p50"] == pytest.approx(2.5)
    assert c["interleaved_turns"] == 2  # the first two; the third played alone
    assert c["streams_peak_in_session"] == 2 and s["streams_peak"] == 2
    assert [(t.k, t.context, t.others, t.rank) for t in a.turns] == [(0, "c0", 0, 0), (1, "c1", 1, 1), (2, "c0", 0, None)]


def test_streams_count_every_playing_context_across_sessions(tmp_path: Path) -> None:
    ev = two_contexts(0) + [[e[0], e[1] + 0.003, 1, *e[3:]] if len(e) > 2 and e[2] == 0 else e for e in two_contexts(0)]
    ev = sorted(ev + [["close", 3.0, 0, "done"], ["close", 3.0, 1, "done"]], key=lambda e: e[1])
    s = analyse(write_raw(tmp_path, ev, contexts=2, sessions=2)).summary
    assert s["sanity"]["ok"], s["sanity"]
    assert s["streams_peak"] == 4 and s["contexts"]["streams_peak_in_session"] == 2


def _swap_audio_context(ev: list[list[Any]]) -> list[list[Any]]:
    out, done = [], False
    for e in ev:
        if e[0] == "a" and e[-1] == "c1" and not done:
            e, done = [*e[:-1], "c0"], True
        out.append(e)
    return out


def _second_c0_turn_early(ev: list[list[Any]]) -> list[list[Any]]:
    """c0's second turn begins while its first is still playing."""
    return sorted([[e[0], e[1] - 0.95, *e[2:]] if len(e) > 3 and e[2] == 0 and e[3] == 2 and e[0] != "close" else e
                   for e in ev], key=lambda e: e[1])


@pytest.mark.parametrize(
    ("mutate", "rule"),
    [
        (_swap_audio_context, "turn_context"),  # a packet of c1's turn labelled c0
        (lambda ev: [[*e[:-1], "c0"] if e[0] == "ts" and e[3] == 1 else e for e in ev], "turn_numbering"),
        (_second_c0_turn_early, "turn_overlap"),  # one open turn per context
        (lambda ev: [[*e[:7], "c5"] if e[0] == "turn" and e[3] == 1 else e for e in ev], "turn_context"),
        (lambda ev: [e for e in ev if not (e[0] == "a" and e[-1] == "c1" and e[4] == 2)], "audio_seq"),  # per turn
    ],
)
def test_per_context_orderings_are_strict(tmp_path: Path, mutate: Any, rule: str) -> None:
    s = analyse(write_raw(tmp_path, mutate(two_contexts()), contexts=2)).summary
    assert not s["sanity"]["ok"]
    assert rule in s["sanity"]["violations"], s["sanity"]


def test_more_contexts_in_flight_than_the_run_has_is_a_violation(tmp_path: Path) -> None:
    ev = session(0) + ctx_turn(0, 0, 1.0, "c0", done=False) + ctx_turn(0, 1, 1.001, "c1", done=False)
    s = analyse(write_raw(tmp_path, sorted(ev, key=lambda e: e[1]), contexts=1)).summary
    assert {"turn_context", "contexts_exceeded"} <= s["sanity"]["violations"].keys(), s["sanity"]


def test_turn_indices_must_follow_the_order_turns_began(tmp_path: Path) -> None:
    ev = session(0) + ctx_turn(0, 1, 1.0, "c0") + ctx_turn(0, 0, 1.001, "c1", speaker=1)
    s = analyse(write_raw(tmp_path, sorted(ev, key=lambda e: e[1]), contexts=2)).summary
    assert "turn_index" in s["sanity"]["violations"], s["sanity"]


def test_a_cancel_stops_only_its_own_contexts_turn(tmp_path: Path) -> None:
    ev = session(0) + ctx_turn(0, 0, 1.0, "c0", packets=3, done=False)
    ev += ctx_turn(0, 1, 1.001, "c1", speaker=1, done=False)
    ev += [["send", 1.1, 0, 0, "cancel", 0], ["done", 1.11, 0, 0, "cancelled", 60.0, 3, 1.0, 0, 0.0, "c0"]]
    fine = analyse(write_raw(tmp_path, sorted(ev, key=lambda e: e[1]), contexts=2)).summary
    assert fine["sanity"]["ok"], fine["sanity"]
    assert fine["contexts"]["by_context"]["c0"]["turns_by_reason"] == {"cancelled": 1}

    both = tmp_path / "both"
    both.mkdir()
    ev += [["done", 1.25, 0, 1, "cancelled", 200.0, 10, 1.0, 0, 0.0, "c1"]]  # c1 stopped by c0's cancel
    s = analyse(write_raw(both, sorted(ev, key=lambda e: e[1]), contexts=2)).summary
    assert s["sanity"]["violations"] == {"cancelled_without_cancel": 1}, s["sanity"]
