"""The sans-I/O conversation: feed messages, assert on the events a gateway would act on."""

from __future__ import annotations

import itertools

import pytest

from realtime.conversation import (
    CancelTurns,
    Conversation,
    EndTurn,
    Limits,
    PlaybackReported,
    Send,
    SynthesizeSegment,
)
from realtime.protocol import Cancel, Flush, Playback, ProtocolError, Text, TurnEnd, TurnStarted
from realtime.segmenter import Segmenter


def conv(next_turn: int = 0, **limits: int) -> Conversation:
    ticks = itertools.count()
    return Conversation(next_turn=next_turn, limits=Limits(**limits), clock=lambda: float(next(ticks)))


def segments(events: list) -> list[str]:
    return [e.text for e in events if isinstance(e, SynthesizeSegment)]


def test_first_sentence_is_ready_before_the_rest_arrives() -> None:
    c = conv(next_turn=4)
    events = c.receive(Text("Hello there", speaker=1))
    assert events == [Send(TurnStarted(turn=4, speaker=1))]
    assert segments(c.receive(Text("."))) == []  # "." may still become "3.5"
    got = c.receive(Text(" How are"))
    assert segments(got) == ["Hello there."]
    assert got[0].turn == 4 and got[0].speaker == 1
    end = c.receive(TurnEnd())
    assert segments(end) == ["How are"] and end[-1] == EndTurn(4)
    assert c.open_turn is None and c.active_turns == (4,)
    c.finished(4)
    assert c.active_turns == ()


def test_token_stream_segments_equal_whole_text() -> None:
    text = "First sentence here. Second one! And a third? Trailing words"
    whole = conv()
    a = segments(whole.receive(Text(text))) + segments(whole.receive(TurnEnd()))
    tokens = conv()
    b: list[str] = []
    for i in range(0, len(text), 3):
        b += segments(tokens.receive(Text(text[i : i + 3])))
    b += segments(tokens.receive(TurnEnd()))
    assert a == b == ["First sentence here.", "Second one!", "And a third?", "Trailing words"]


def test_flush_cuts_but_keeps_the_turn_open() -> None:
    c = conv()
    c.receive(Text("no terminator yet"))
    assert segments(c.receive(Flush())) == ["no terminator yet"]
    assert c.open_turn == 0
    assert c.receive(Text("more")) == [] and c.open_turn == 0  # same turn: no new turn.started


def test_speaker_change_inside_a_turn_becomes_a_tag_and_carries_to_next_segment() -> None:
    c = conv()
    ev = c.receive(Text("Hi Bob. ", speaker=0))
    ev += c.receive(Text("Hi Alice, long time. ", speaker=1))
    seg = [e for e in ev if isinstance(e, SynthesizeSegment)]
    assert seg[0].text == "Hi Bob." and seg[0].speaker == 0
    ev = c.receive(Text("Indeed. "))
    seg += [e for e in ev if isinstance(e, SynthesizeSegment)]
    assert seg[1].text == "<|speaker:1|>Hi Alice, long time." and seg[1].speaker == 0
    assert seg[2].text == "Indeed." and seg[2].speaker == 1


def test_cancel_ends_open_and_closing_turns_and_drops_buffered_text() -> None:
    c = conv()
    c.receive(Text("Turn zero."))
    c.receive(TurnEnd())
    c.receive(Text("Turn one is still being typed"))
    assert c.receive(Cancel()) == [CancelTurns((0, 1))]
    assert c.active_turns == () and c.receive(Cancel()) == []  # idempotent
    ev = c.receive(Text("Fresh"))
    assert ev == [Send(TurnStarted(turn=2, speaker=0))]


def test_turn_end_without_turn_and_playback_of_future_turn_are_errors() -> None:
    c = conv()
    with pytest.raises(ProtocolError):
        c.receive(TurnEnd())
    with pytest.raises(ProtocolError):
        c.receive(Playback(turn=0, played_ms=10))
    c.receive(Text("x"))
    assert c.receive(Playback(turn=0, played_ms=10)) == [PlaybackReported(0, 10)]


def test_text_limits_reject_without_losing_the_turn() -> None:
    c = conv(turn_chars=50)
    c.receive(Text("a" * 40))
    with pytest.raises(ProtocolError) as info:
        c.receive(Text("b" * 20))
    assert info.value.code == "limit"
    assert segments(c.receive(TurnEnd())) == ["a" * 40]


def test_length_bound_cuts_long_unpunctuated_text_at_a_space() -> None:
    s = Segmenter(max_chars=40)
    out = s.feed("word " * 20)
    assert out and all(len(x) <= 40 for x in out)
    assert all(not x.endswith("wor") for x in out)


def test_tags_are_never_split() -> None:
    s = Segmenter(max_chars=20)
    text = "abcdefghijklmnop [professional broadcast tone] tail"
    out = s.feed(text) + [s.flush() or ""]
    assert any("[professional broadcast tone]" in x for x in out)
    assert "".join(out).replace(" ", "") == text.replace(" ", "")


def test_abbreviations_and_decimals_do_not_end_sentences() -> None:
    s = Segmenter()
    assert s.feed("Dr. Who paid 3.50 dollars. Then ") == ["Dr. Who paid 3.50 dollars."]
