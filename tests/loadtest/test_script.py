"""Conversation plans: deterministic, LLM-like tokens, alternating speakers."""

from __future__ import annotations

import pytest

from loadtest.config import SwarmConfig, check_loopback
from loadtest.script import CORPUS, tokenize, turn_plan

URL = "ws://127.0.0.1:9/v1/realtime"


def test_tokens_rebuild_the_text_and_carry_their_leading_space() -> None:
    text = "Welcome back, traveller. How are you?"
    tokens = tokenize(text)
    assert "".join(tokens) == text
    assert tokens[:3] == ["Welcome", " back,", " traveller."]


def test_plans_are_a_pure_function_of_seed_session_and_turn() -> None:
    a = SwarmConfig(url=URL, seed=7, barge_in=0.5)
    b = SwarmConfig(url=URL, seed=8, barge_in=0.5)
    assert turn_plan(a, 3, 4) == turn_plan(a, 3, 4)
    assert [turn_plan(a, 3, k).text for k in range(10)] != [turn_plan(b, 3, k).text for k in range(10)]


def test_turns_alternate_speakers_and_use_whole_corpus_sentences() -> None:
    config = SwarmConfig(url=URL, sentences=(2, 2), speaker_change=1.0)
    plans = [turn_plan(config, 0, k) for k in range(6)]
    assert [p.speaker for p in plans] == [0, 1, 0, 1, 0, 1]
    for p in plans:
        assert p.pieces[0].speaker == p.speaker and p.pieces[1].speaker == 1 - p.speaker
        assert "".join(p.pieces[0].tokens) in CORPUS
        assert p.barge_after_ms is None


def test_barge_in_rate_is_respected_roughly() -> None:
    config = SwarmConfig(url=URL, barge_in=0.3)
    barged = sum(turn_plan(config, s, k).barge_after_ms is not None for s in range(20) for k in range(20))
    assert 80 <= barged <= 160


@pytest.mark.parametrize(
    "url", ["ws://10.0.0.5:8000/v1/realtime", "ws://example.com:80/", "wss://127.0.0.1:8000/", "ws://127.0.0.1/"]
)
def test_load_goes_to_loopback_only(url: str) -> None:
    with pytest.raises(ValueError):
        check_loopback(url)
    with pytest.raises(ValueError):
        SwarmConfig(url=url)


def test_loopback_urls_are_accepted() -> None:
    for url in ("ws://127.0.0.1:8000/v1/realtime", "ws://localhost:1/", "ws://[::1]:8000/v1/realtime"):
        assert check_loopback(url) == url
