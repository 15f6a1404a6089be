"""``output.mix``: the audio of concurrent turns summed into one stream, for clients that cannot mix (a phone line, a
simple speaker). Sans I/O: the gateway pushes each turn's frames in (already resampled to the output rate, paced on
the turn's own clock) and pops mixed frames out at the listener's pace.

Each turn is a track: a FIFO of its frames, in order. A slot (one output frame) takes the head frame of every track
that has one and sums them. A slot is *ready* when every unfinished track has a frame, so no voice is cut short
needlessly (a track resting between segments, waiting for more text, holds no slot back); when the listener's buffer
runs low the gateway takes the slot anyway, and a track with nothing yet is silent there (its audio then starts, or
goes on, one frame later). A track's ``turn.done`` leaves right after its
last frame; a dropped (cancelled) track loses its queued frames and its ``turn.done`` leaves at the next slot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from realtime.protocol import ServerMessage

__all__ = ["Mixer"]


@dataclass
class _Track:
    frames: deque[np.ndarray] = field(default_factory=deque)
    done: ServerMessage | None = None  # set once the turn has no more frames to come
    resting: bool = False  # between segments (waiting for text): nothing is on its way, no slot waits for it


class Mixer:
    def __init__(self, frame_samples: int) -> None:
        if frame_samples < 1:
            raise ValueError("frame_samples must be positive")
        self.frame_samples = frame_samples
        self._tracks: dict[int, _Track] = {}
        self._ended: set[int] = set()  # turns whose turn.done went out: a late frame of theirs is not taken

    def push(self, turn: int, frame: np.ndarray) -> None:
        if frame.shape != (self.frame_samples,):
            raise ValueError(f"a frame is {self.frame_samples} samples, got {frame.shape}")
        if turn in self._ended:
            return
        track = self._tracks.setdefault(turn, _Track())
        if track.done is None:
            track.frames.append(frame)
            track.resting = False

    def rest(self, turn: int) -> None:
        """The engine is done with a segment of ``turn``: until it pushes again, slots need not wait for it."""
        track = self._tracks.get(turn)
        if track is not None:
            track.resting = True

    def finish(self, turn: int, done: ServerMessage) -> None:
        """No more frames of ``turn``: ``done`` goes out right after its last one."""
        self._tracks.setdefault(turn, _Track()).done = done

    def drop(self, turn: int) -> None:
        """Cancelled: its queued frames are not played."""
        track = self._tracks.get(turn)
        if track is not None:
            track.frames.clear()

    def pending(self) -> bool:
        """Is there anything to pop (a frame, or a turn.done)?"""
        return any(t.frames or t.done is not None for t in self._tracks.values())

    def ready(self) -> bool:
        """Every track still speaking has its next frame here (and at least one track has one)."""
        if not any(t.frames for t in self._tracks.values()):
            return any(t.done is not None for t in self._tracks.values())
        return all(t.frames or t.done is not None or t.resting for t in self._tracks.values())

    def pop(self) -> tuple[np.ndarray | None, tuple[int, ...], list[ServerMessage]]:
        """The next slot: the summed frame (None if no track had one), the turns in it, and the turn.done messages
        to send after it."""
        mixed: np.ndarray | None = None
        turns: list[int] = []
        dones: list[ServerMessage] = []
        for turn, track in list(self._tracks.items()):
            if track.frames:
                frame = track.frames.popleft()
                mixed = frame.copy() if mixed is None else mixed + frame
                turns.append(turn)
            if not track.frames and track.done is not None:
                dones.append(track.done)
                del self._tracks[turn]
                self._ended.add(turn)
        if mixed is not None:
            np.clip(mixed, -1.0, 1.0, out=mixed)
        return mixed, tuple(turns), dones
