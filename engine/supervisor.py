"""The restart policy for child processes that should be running: one for every out-of-process engine.

Two users keep children alive: the built-in voice's espeak-ng workers (``engine.espeak``: asyncio, replaced when
one dies or stops answering, spawned on demand) and ``shoal serve --workers N``'s ``shoal worker`` processes
(``realtime.worker_process``: a watcher thread, from before the event loop until after it). They differ in how a
child is spawned and how it is seen to be dead or hung; everything else is decided here, sans I/O, the same way
for both:

- when to start a failed slot again: ``first_s`` after a child that had run ``settled_s`` or more, doubling up to
  ``max_s`` while its children keep failing young (or cannot start at all);
- the reason, said once per failure: ``<name> (pid N) <reason>; restarting it in <delay> s``;
- the counters: ``restarts`` (children started again after a failure), ``last_failure`` (why the latest one went);
- stopping: after ``stop()`` a failure restarts nothing and says nothing.

    supervisor = Supervisor("engine worker w{slot}", slots=2, backoff=Backoff(first_s=1.0, max_s=30.0))
    supervisor.started(0)                       # the user spawned slot 0's child
    delay = supervisor.failed(0, "exited with code -9", pid=1234)   # it died: says so, returns 1.0
    ... wait supervisor.wait_s(0) seconds, spawn again, supervisor.started(0) ...

The user calls it from one thread or one event loop (``stop()`` and the counters may be read from any thread).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff", "Supervisor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    first_s: float = 1.0  # delay before restarting a child that had run a while
    max_s: float = 30.0  # the delay doubles up to this while a slot's children keep failing young
    settled_s: float = 60.0  # a child that ran this long was healthy: its failure starts again at first_s

    def __post_init__(self) -> None:
        for name in ("first_s", "max_s", "settled_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and 0 < value <= 3600):
                raise ValueError(f"{name} must be a number of seconds within (0, 3600]")
        if self.first_s > self.max_s:
            raise ValueError("first_s must not exceed max_s")

    def next_delay(self, previous_s: float | None, lived_s: float | None) -> float:
        """The delay after a failure: ``previous_s`` the delay before the last start (None: none), ``lived_s`` how
        long the failed child ran (None: it never started)."""
        if previous_s is None or (lived_s is not None and lived_s >= self.settled_s):
            return self.first_s
        return min(self.max_s, previous_s * 2)


@dataclass
class _Slot:
    started_at: float | None = None  # clock time the running child started; None while there is none
    delay_s: float | None = None  # the delay before the latest restart, while its children fail young
    due_at: float | None = None  # clock time a failed slot may be started again; None: not failed


class Supervisor:
    """The restart policy for ``slots`` places that should each hold a running child; see the module docstring.

    ``name`` names a slot's child in what is said (``{slot}`` is replaced by the slot's index); ``say`` says it
    (default: a warning on this module's logger); ``clock`` is monotonic seconds (a fake in tests).
    """

    def __init__(
        self,
        name: str,
        slots: int,
        backoff: Backoff | None = None,
        *,
        say: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.name, self.backoff = name, backoff or Backoff()
        self._say = say or log.warning
        self._clock = clock
        self._slots = [_Slot() for _ in range(slots)]
        self.restarts = 0  # children started again after a failure
        self.last_failure: str | None = None  # why the latest child failed; None once one has started since
        self.stopped = False

    def started(self, slot: int) -> None:
        """The user spawned ``slot``'s child (after a failure, that is a restart)."""
        s = self._slots[slot]
        if s.due_at is not None:
            self.restarts += 1
        s.started_at, s.due_at = self._clock(), None
        self.last_failure = None

    def failed(self, slot: int, reason: str, *, pid: int | None = None) -> float | None:
        """``slot``'s child died, hung or could not start (``reason`` says which, ``pid`` which child): says so
        once and returns the seconds until it may be started again, or None once stopped (nothing restarts).
        Report each failure once: a failed start of a failing slot is one more failure (its delay doubles)."""
        if self.stopped:
            return None
        s = self._slots[slot]
        now = self._clock()
        lived = None if s.started_at is None else now - s.started_at
        s.delay_s = self.backoff.next_delay(s.delay_s, lived)
        s.started_at, s.due_at = None, now + s.delay_s
        self.last_failure = reason
        who = self.name.format(slot=slot) + ("" if pid is None else f" (pid {pid})")
        self._say(f"{who} {reason}; restarting it in {s.delay_s:g} s")
        return s.delay_s

    def failing(self, slot: int) -> bool:
        """Whether ``slot``'s last child failed and no new one has started since."""
        return self._slots[slot].due_at is not None

    def wait_s(self, slot: int) -> float:
        """Seconds until ``slot`` may be started (0: now; a slot that never failed may always be started)."""
        due = self._slots[slot].due_at
        return 0.0 if due is None else max(0.0, due - self._clock())

    def stop(self) -> None:
        """From now on a failure restarts nothing (the user is ending its children)."""
        self.stopped = True
