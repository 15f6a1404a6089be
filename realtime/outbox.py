"""The bounded outgoing queue of one connection, in two lanes: control messages jump ahead of the stream.

The stream lane keeps a turn's ``audio``, ``segment`` and ``turn.done`` in order and is bounded (producers
wait: that is the backpressure that throttles the engine). The control lane (``pong``, ``error``, ...) is bounded
too, but a client is never dropped for filling it: the receive loop waits for ``control_room`` before it reads the
next message, so a burst of pings (or of refused input) is answered at the pace the client reads its answers, and
a client that does not read at all stops being read (the slow-reader watchdog ends it). ``put`` takes messages
past the bound up to a hard cap, for the few the server sends on its own (store and engine errors).
``drop_audio`` removes a cancelled turn's queued audio in one step, so a barge-in silences the stream within the
packet being written.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from realtime.protocol import Audio, Segment, ServerMessage, Visemes, Words


class OutboxFull(Exception):
    """The control queue passed its hard cap: the client does not read."""


@dataclass(frozen=True)
class Close:
    """Sentinel: close the socket with this code once everything before it has been sent."""

    code: int
    reason: str = ""


Item = ServerMessage | Close


class Outbox:
    def __init__(self, audio_limit: int, control_limit: int) -> None:
        self._audio: deque[ServerMessage] = deque()
        self._control: deque[Item] = deque()
        self._audio_limit = audio_limit
        self._control_limit = control_limit
        self._readable = asyncio.Event()
        self._audio_space = asyncio.Event()
        self._audio_space.set()
        self._control_space = asyncio.Event()
        self._control_space.set()
        self.closed = False

    def put(self, item: Item) -> None:
        if self.closed:
            return
        if len(self._control) >= 2 * self._control_limit:
            raise OutboxFull("too many messages waiting for a client that does not read")
        self._control.append(item)
        self._readable.set()

    async def control_room(self) -> None:
        """Wait until the control lane is below its bound (the receive loop's backpressure)."""
        while len(self._control) >= self._control_limit and not self.closed:
            self._control_space.clear()
            await self._control_space.wait()

    def put_stream(self, msg: Item) -> None:
        """Append to the stream lane past its bound (for the rare small message that ends a turn)."""
        if not self.closed:
            self._audio.append(msg)
            self._readable.set()

    def try_put_audio(self, msg: Audio | Segment) -> bool:
        """Append without waiting if the stream lane has room (the common case: no task, no timer)."""
        if self.closed:
            return True
        if len(self._audio) >= self._audio_limit:
            return False
        self._audio.append(msg)
        self._readable.set()
        return True

    async def put_audio(self, msg: Audio | Segment) -> None:
        while len(self._audio) >= self._audio_limit and not self.closed:
            self._audio_space.clear()
            await self._audio_space.wait()
        if self.closed:
            return
        self._audio.append(msg)
        self._readable.set()

    def drop_audio(self, turns: set[int]) -> int:
        kept = [m for m in self._audio if not (isinstance(m, (Audio, Segment, Words, Visemes)) and m.turn in turns)]
        dropped = len(self._audio) - len(kept)
        self._audio = deque(kept)
        self._audio_space.set()
        return dropped

    def close(self) -> None:
        """No more sending: wake every waiter and drop what is queued."""
        self.closed = True
        self._audio.clear()
        self._control.clear()
        self._audio_space.set()
        self._control_space.set()
        self._readable.set()

    async def get(self) -> Item | None:
        """Next item to send (control first), or None once closed."""
        while True:
            if self.closed:
                return None
            if self._control:
                item = self._control.popleft()
                if len(self._control) < self._control_limit:
                    self._control_space.set()
                return item
            if self._audio:
                msg = self._audio.popleft()
                self._audio_space.set()
                return msg
            self._readable.clear()
            await self._readable.wait()
