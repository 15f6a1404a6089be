"""The restart policy shared by every out-of-process engine (sans I/O: a fake clock, children as slot events)."""

from __future__ import annotations

import pytest

from engine.supervisor import Backoff, Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def supervised(clock: Clock, slots: int = 1, **backoff: float) -> tuple[Supervisor, list[str]]:
    said: list[str] = []
    return Supervisor("worker w{slot}", slots, Backoff(**backoff), say=said.append, clock=clock), said


def test_a_child_that_keeps_exiting_at_once_is_restarted_later_and_later_up_to_the_cap(clock: Clock) -> None:
    supervisor, said = supervised(clock, first_s=1.0, max_s=30.0)
    supervisor.started(0)
    delays = []
    for pid in range(10, 17):
        delay = supervisor.failed(0, "exited with code 1", pid=pid)
        assert delay is not None and supervisor.failing(0)
        assert supervisor.wait_s(0) == delay
        clock.now += delay / 2
        assert supervisor.wait_s(0) == delay / 2  # not yet
        clock.now += delay / 2
        assert supervisor.wait_s(0) == 0
        supervisor.started(0)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert said[0] == "worker w0 (pid 10) exited with code 1; restarting it in 1 s"  # once per failure
    assert len(said) == 7 and said[-1].endswith("restarting it in 30 s")
    assert supervisor.restarts == 7 and supervisor.last_failure is None


def test_a_child_that_ran_a_while_is_restarted_after_the_first_delay_again(clock: Clock) -> None:
    supervisor, _ = supervised(clock, first_s=1.0, max_s=30.0, settled_s=60.0)
    supervisor.started(0)
    assert [supervisor.failed(0, "died"), supervisor.failed(0, "could not start")] == [1, 2]  # a failed start counts
    clock.now += 2
    supervisor.started(0)
    clock.now += 60
    assert supervisor.failed(0, "died") == 1


def test_slots_back_off_independently_and_a_fresh_slot_may_start_at_once(clock: Clock) -> None:
    supervisor, said = supervised(clock, slots=2, first_s=0.5, max_s=5.0)
    assert supervisor.wait_s(1) == 0 and not supervisor.failing(1)
    supervisor.started(0)
    supervisor.started(1)
    assert supervisor.failed(0, "died") == 0.5 and supervisor.failed(0, "could not start") == 1.0
    assert supervisor.failed(1, "stopped answering", pid=7) == 0.5
    assert said[-1] == "worker w1 (pid 7) stopped answering; restarting it in 0.5 s"
    assert supervisor.restarts == 0  # nothing started again yet
    assert supervisor.last_failure == "stopped answering"


def test_a_stopped_supervisor_restarts_nothing_and_says_nothing(clock: Clock) -> None:
    supervisor, said = supervised(clock)
    supervisor.started(0)
    supervisor.stop()
    assert supervisor.failed(0, "exited with code 0") is None
    assert said == [] and not supervisor.failing(0) and supervisor.restarts == 0


def test_the_last_failure_is_kept_until_a_child_starts(clock: Clock) -> None:
    supervisor, _ = supervised(clock)
    supervisor.failed(0, "could not start: no such voice")  # the first start failed
    assert supervisor.last_failure == "could not start: no such voice"
    clock.now += supervisor.wait_s(0)
    supervisor.started(0)
    assert supervisor.last_failure is None and supervisor.restarts == 1


@pytest.mark.parametrize("backoff", [{"first_s": 0}, {"max_s": float("inf")}, {"first_s": 5.0, "max_s": 1.0},
                                     {"settled_s": True}])
def test_backoff_is_validated(backoff: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**backoff)
