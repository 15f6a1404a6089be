"""Word timing in the load test (``--timestamps``): the client asks for it and records ``words`` / ``visemes``, the
statistics step counts them and holds each ``words`` message to arriving before the first audio packet it covers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from loadtest.client import Live, SimSession, TurnState
from loadtest.config import SwarmConfig
from loadtest.player import Player
from loadtest.record import Recorder, read_events
from loadtest.script import turn_plan
from loadtest.stats import analyse
from tests.loadtest.test_stats import session, turn_events, write_raw

URL = "ws://127.0.0.1:9/v1/realtime"


def with_timing(events: list[list[Any]], *, words_at: float | None = None, first_ms: float = 12.0,
                visemes: bool = True) -> list[list[Any]]:
    """A turn's events with one segment's ``words`` (and ``visemes``) arriving at ``words_at`` (default: right after
    the segment, before the first audio). Its 10 packets of 20 ms arrive every 10 ms from 1.05."""
    seg_t = next(e[1] for e in events if e[0] == "seg")
    t = seg_t + 0.0001 if words_at is None else words_at
    extra = [["w", t, 0, 0, 2, first_ms, False, None]]
    if visemes:
        extra.append(["v", t + 0.00001, 0, 0, 5, None])
    return sorted(events + extra, key=lambda e: e[1])


def summary_of(tmp_path: Path, events: list[list[Any]], timestamps: str = "visemes") -> dict[str, Any]:
    return analyse(write_raw(tmp_path, session(0) + events + [["close", 3.0, 0, "done"]], timestamps=timestamps)).summary


def test_words_before_the_audio_they_cover_are_counted_and_sane(tmp_path: Path) -> None:
    s = summary_of(tmp_path, with_timing(turn_events(0, 0, 1.0)))
    assert s["sanity"]["ok"], s["sanity"]
    assert s["timing"] == {"requested": "visemes", "words_messages": 1, "words": 2, "estimated_messages": 0,
                           "visemes_messages": 1, "visemes": 5}


def test_words_after_audio_that_covers_them_fail_the_sanity_check(tmp_path: Path) -> None:
    # packets 0..2 (0-60 ms) arrived at 1.05, 1.06, 1.07 before words whose first starts at 12 ms
    s = summary_of(tmp_path, with_timing(turn_events(0, 0, 1.0), words_at=1.075))
    assert not s["sanity"]["ok"]
    assert s["sanity"]["violations"] == {"words_after_audio": 1}
    assert "words from 12.0 ms after audio up to 60.0 ms" in s["sanity"]["examples"][0]


def test_audio_that_ends_where_the_first_word_starts_is_not_a_violation(tmp_path: Path) -> None:
    # a later segment: packets 0..4 (0-100 ms) are in when its words arrive; the first word starts at 100 ms
    s = summary_of(tmp_path, with_timing(turn_events(0, 0, 1.0), words_at=1.095, first_ms=100.0))
    assert s["sanity"]["ok"], s["sanity"]
    late = tmp_path / "late"
    late.mkdir()
    s = summary_of(late, with_timing(turn_events(0, 0, 1.0), words_at=1.095, first_ms=99.0))
    assert s["sanity"]["violations"] == {"words_after_audio": 1}


@pytest.mark.parametrize(
    ("timestamps", "mutate", "rule"),
    [
        ("none", lambda ev: ev, "timing_unrequested"),  # words nobody asked for
        ("words", lambda ev: ev, "timing_unrequested"),  # visemes with words only
        ("visemes", lambda ev: [e for e in ev if e[0] != "w"], "visemes_before_words"),
        ("visemes", lambda ev: [["w", 1.001, *e[2:]] if e[0] == "w" else e for e in ev], "words_before_segment"),
    ],
)
def test_word_timing_orderings(tmp_path: Path, timestamps: str, mutate: Any, rule: str) -> None:
    s = summary_of(tmp_path, sorted(mutate(with_timing(turn_events(0, 0, 1.0))), key=lambda e: e[1]), timestamps)
    assert rule in s["sanity"]["violations"], s["sanity"]


def test_timestamps_go_into_session_start_output_only_when_asked() -> None:
    assert "timestamps" not in SwarmConfig(url=URL).output()
    assert SwarmConfig(url=URL, timestamps="words").output()["timestamps"] == "words"
    with pytest.raises(ValueError, match="timestamps"):
        SwarmConfig(url=URL, timestamps="phonemes")


def test_the_reader_records_words_and_visemes(tmp_path: Path) -> None:
    config = SwarmConfig(url=URL, timestamps="visemes")
    rec = Recorder(tmp_path / "events.msgpack")

    async def scenario() -> None:
        sim = SimSession(0, config, rec, Live(), hard_stop=60.0)
        sim.current[None] = TurnState(turn_plan(config, 0, 0), Player(0.0), k=0)
        sim._on_message(0.1, {"type": "turn.started", "turn": 0, "speaker": 0})
        sim._on_message(0.2, {"type": "segment", "turn": 0, "text": "Hello there.", "ms": 0.0})
        sim._on_message(0.21, {"type": "words", "turn": 0, "estimated": False, "words": [
            {"text": "Hello", "start_ms": 12.0, "end_ms": 410.5}, {"text": "there.", "start_ms": 410.5, "end_ms": 902.25}]})
        sim._on_message(0.22, {"type": "visemes", "turn": 0, "visemes": [{"id": 0, "start_ms": 0.0}, {"id": 9, "start_ms": 12.0}]})
        sim._on_message(0.23, {"type": "words", "turn": 0, "estimated": True, "words": [], "context": "x"})

    asyncio.run(scenario())
    rec.close()
    events = [e for e in read_events(tmp_path / "events.msgpack") if e[0] in ("w", "v", "err")]
    assert events == [["w", 0.21, 0, 0, 2, 12.0, False, None], ["v", 0.22, 0, 0, 2, None],
                      ["w", 0.23, 0, 0, 0, None, True, "x"]]
