"""A simulated real-time player: a clock-driven buffer that counts underruns.

Audio arrives in packets of known duration. Playback starts once ``prebuffer_ms`` is buffered (0: with the
first packet) and then advances with the wall clock. When the buffer runs dry the listener hears a gap: that
is an *underrun*; playback stalls and resumes when the next packet arrives. A dry buffer is only noticed when
more audio comes (audio that simply ended is not a gap), so the counts are final once the turn is done.

Pure: the caller passes the time. The swarm runs one per turn live; the statistics step replays the same class
over the recorded arrival times, so the two must agree exactly.
"""

from __future__ import annotations


class Player:
    def __init__(self, prebuffer_ms: float = 0.0) -> None:
        self.prebuffer_ms = prebuffer_ms
        self.received_ms = 0.0  # audio received so far
        self.played_ms = 0.0  # playback position at ``_last``
        self.started_at: float | None = None
        self._last = 0.0
        self.underruns = 0
        self.underrun_ms = 0.0
        self.stopped = False

    def push(self, now: float, ms: float) -> None:
        """A packet of ``ms`` milliseconds arrived at ``now`` (seconds, any monotonic clock)."""
        if self.stopped:
            return
        if self.started_at is None:
            self.received_ms += ms
            if self.received_ms >= self.prebuffer_ms:
                self.started_at = self._last = now
            return
        position = self.played_ms + (now - self._last) * 1000.0
        if position > self.received_ms:
            self.underruns += 1
            self.underrun_ms += position - self.received_ms
            position = self.received_ms
        self.played_ms = position
        self._last = now
        self.received_ms += ms

    def position(self, now: float) -> float:
        """Milliseconds heard by ``now``."""
        if self.started_at is None:
            return 0.0
        if self.stopped:
            return self.played_ms
        return min(self.received_ms, self.played_ms + (now - self._last) * 1000.0)

    def remaining_ms(self, now: float) -> float:
        """Buffered audio not yet heard (if playback has not started: all of it)."""
        return self.received_ms - self.position(now)

    def start_if_waiting(self, now: float) -> None:
        """The stream ended before the prebuffer filled: play what there is."""
        if self.started_at is None and self.received_ms > 0 and not self.stopped:
            self.started_at = self._last = now

    def stop(self, now: float) -> float:
        """Barge-in: drop the buffer. Returns the milliseconds heard."""
        heard = self.position(now)
        self.played_ms = heard
        self.stopped = True
        return heard
