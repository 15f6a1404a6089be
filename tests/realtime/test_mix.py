"""The mixer, sans I/O: frames of concurrent turns in, summed slots out, turn.done right after each turn's last frame."""

from __future__ import annotations

import numpy as np
import pytest

from realtime.mix import Mixer
from realtime.protocol import TurnDone

N = 4


def frame(value: float) -> np.ndarray:
    return np.full(N, value, dtype=np.float32)


def done(turn: int) -> TurnDone:
    return TurnDone(turn=turn, reason="complete", audio_ms=0.0, frames=0, ttfa_ms=None)


def test_slots_sum_the_turns_in_flight_and_clip() -> None:
    m = Mixer(N)
    m.push(0, frame(0.25))
    assert m.ready()
    m.push(1, frame(0.5))
    m.push(1, frame(0.9))
    m.push(0, frame(0.3))
    pcm, turns, dones = m.pop()
    assert turns == (0, 1) and np.allclose(pcm, 0.75) and dones == []
    pcm, turns, _ = m.pop()
    assert turns == (0, 1) and np.allclose(pcm, 1.0)  # 1.2 clipped


def test_a_slot_waits_for_a_voice_still_speaking_until_forced() -> None:
    m = Mixer(N)
    m.push(0, frame(0.1))
    m.push(1, frame(0.2))
    m.pop()
    m.push(0, frame(0.1))  # turn 1's next frame is late
    assert not m.ready()
    pcm, turns, _ = m.pop()  # forced by the gateway: turn 1 is silent in this slot
    assert turns == (0,) and np.allclose(pcm, 0.1)


def test_turn_done_leaves_right_after_the_turns_last_frame() -> None:
    m = Mixer(N)
    m.push(0, frame(0.1))
    m.push(0, frame(0.1))
    m.push(1, frame(0.2))
    m.finish(1, done(1))
    assert m.pop()[2] == [done(1)]  # with its last frame
    m.finish(0, done(0))
    _, turns, dones = m.pop()
    assert turns == (0,) and dones == [done(0)] and not m.pending()


def test_a_dropped_turn_plays_no_more_and_is_done_at_the_next_slot() -> None:
    m = Mixer(N)
    for _ in range(3):
        m.push(0, frame(0.1))
        m.push(1, frame(0.2))
    m.pop()
    m.drop(1)
    m.finish(1, done(1))
    pcm, turns, dones = m.pop()
    assert turns == (0,) and np.allclose(pcm, 0.1) and dones == [done(1)]
    m.push(1, frame(0.5))  # nothing more of a finished turn is taken
    assert m.pop()[1] == (0,)


def test_frames_of_the_wrong_size_are_refused() -> None:
    with pytest.raises(ValueError):
        Mixer(N).push(0, np.zeros(N + 1, np.float32))


def test_a_voice_resting_between_segments_holds_no_slot_back() -> None:
    m = Mixer(N)
    m.push(0, frame(0.1))  # turn 0 said a few words and waits for more text
    m.pop()
    m.rest(0)
    m.push(1, frame(0.2))
    assert m.ready()  # turn 1 need not wait for turn 0
    m.push(0, frame(0.1))  # turn 0 speaks again: slots wait for it again when it runs dry
    m.pop()
    m.push(1, frame(0.2))
    assert not m.ready()
