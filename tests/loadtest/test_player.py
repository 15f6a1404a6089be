"""The simulated player: a clock-driven buffer that counts the gaps a listener would hear."""

from __future__ import annotations

import pytest

from loadtest.player import Player


def test_audio_that_arrives_ahead_of_playback_never_underruns() -> None:
    p = Player()
    for i in range(50):  # 20 ms packets every 10 ms: twice real time
        p.push(i * 0.010, 20.0)
    assert p.underruns == 0 and p.underrun_ms == 0.0
    assert p.position(0.49) == pytest.approx(490.0)
    assert p.remaining_ms(0.49) == pytest.approx(1000.0 - 490.0)


def test_a_late_packet_is_one_underrun_of_the_time_the_buffer_was_dry() -> None:
    p = Player()
    p.push(0.000, 20.0)
    p.push(0.010, 20.0)  # 40 ms buffered by 10 ms
    p.push(0.070, 20.0)  # the buffer ran dry at 40 ms: 30 ms of silence
    assert p.underruns == 1
    assert p.underrun_ms == pytest.approx(30.0)
    p.push(0.080, 20.0)  # back on time after the stall: playback resumed at 70 ms
    assert p.underruns == 1
    assert p.position(0.080) == pytest.approx(50.0)


def test_prebuffer_delays_playback_and_absorbs_a_late_second_packet() -> None:
    strict, buffered = Player(0.0), Player(40.0)
    for t in (0.000, 0.0225, 0.030, 0.040):  # the second packet 22.5 ms after the first
        strict.push(t, 20.0)
        buffered.push(t, 20.0)
    assert strict.underruns == 1 and strict.underrun_ms == pytest.approx(2.5)
    assert buffered.underruns == 0
    assert buffered.started_at == pytest.approx(0.0225)
    assert buffered.position(0.0225) == 0.0


def test_audio_that_simply_ends_is_not_an_underrun() -> None:
    p = Player()
    p.push(0.0, 20.0)
    assert p.position(5.0) == 20.0 and p.remaining_ms(5.0) == 0.0
    assert p.underruns == 0


def test_stop_freezes_what_was_heard_and_ignores_later_packets() -> None:
    p = Player()
    p.push(0.0, 100.0)
    heard = p.stop(0.030)
    assert heard == pytest.approx(30.0)
    p.push(0.500, 20.0)
    assert p.underruns == 0 and p.position(1.0) == pytest.approx(30.0)


def test_a_stream_shorter_than_the_prebuffer_is_played_at_its_end() -> None:
    p = Player(100.0)
    p.push(0.0, 20.0)
    assert p.started_at is None and p.remaining_ms(0.5) == 20.0
    p.start_if_waiting(0.5)
    assert p.position(0.51) == pytest.approx(10.0)
