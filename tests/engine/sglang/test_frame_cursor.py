"""FrameCursor under SGLang's real streaming: one live list per request, growing while outputs wait to be read.

With ``incremental_streaming_output=False`` SGLang 0.5.23 puts the request's accumulated ``customized_info`` list
itself into every output's ``meta_info`` (``TokenizerManager._accumulate_request_meta_info``), so by the time an
output is read the list may hold rows its ``completion_tokens`` does not count yet, and outputs may be coalesced
(only the last queued one is handed out). Every frame must still come out exactly once, in order.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.sglang.convert import FRAME_KEY, FrameCursor
from tests.engine.sglang.test_convert import IDS, row


class LiveStream:
    """SGLang's side: one request's accumulated list and the outputs queued for the reader."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []  # the one list object every output's meta_info refers to
        self.queue: list[dict] = []

    def step(self, frame: np.ndarray, finish: dict | None = None) -> None:
        self.rows.append(frame)  # extended in place, as SGLang does
        meta = {"completion_tokens": len(self.rows), "prompt_tokens": 9, "cached_tokens": 0,
                FRAME_KEY: self.rows, "finish_reason": finish}
        self.queue.append({"output_ids": [int(r[0]) for r in self.rows], "meta_info": meta})

    def take(self) -> dict | None:
        """What ``generate_request`` hands out: the last queued output (earlier ones are dropped)."""
        if not self.queue:
            return None
        out, self.queue = self.queue[-1], []
        return out


def frames_of(updates: list) -> np.ndarray:
    return np.concatenate([u.codes for u in updates], axis=1)


@pytest.mark.parametrize("seed", range(40))
def test_every_frame_once_in_order_under_random_interleavings(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    sent = [row(270 + i % 60, code=i % 7) for i in range(n)]
    stream, cursor, updates = LiveStream(), FrameCursor(IDS), []
    pending: dict | None = None  # an output taken from the queue but not yet fed (the reader is slow)
    for i, frame in enumerate(sent):
        stream.step(frame, {"type": "length", "length": n} if i == n - 1 else None)
        if rng.random() < 0.5:  # the reader wakes up: take an output now ...
            taken = stream.take()
            pending = taken or pending
        if pending is not None and rng.random() < 0.5:  # ... and feed it now or after more steps grew the list
            updates.append(cursor.feed(pending))
            pending = None
    while True:  # drain
        if pending is not None:
            updates.append(cursor.feed(pending))
        pending = stream.take()
        if pending is None:
            break
    got = frames_of(updates)
    expected = np.stack([r[1:-1] for r in sent], axis=1).astype(np.int16)
    assert got.shape == expected.shape and np.array_equal(got, expected)
    assert updates[-1].done and updates[-1].reason == "length"


def test_an_output_read_after_the_list_grew_takes_the_new_rows_once() -> None:
    """The case that duplicated frames: an output whose completion_tokens says 2 while the live list holds 3."""
    stream, cursor = LiveStream(), FrameCursor(IDS)
    stream.step(row(270))
    first = cursor.feed(stream.take())
    stream.step(row(271))
    late = stream.take()
    stream.step(row(272))
    second = cursor.feed(late)  # completion_tokens 2, list of 3
    third = cursor.feed(stream.take())  # completion_tokens 3, list of 3: nothing new
    assert [u.codes.shape[1] for u in (first, second, third)] == [1, 2, 0]
    assert frames_of([first, second, third])[0].tolist() == [2, 3, 4]


def test_a_stream_of_deltas_is_refused_not_misread() -> None:
    """Shoal runs SGLang with cumulative lists; a delta stream (the list shrinks) is a clear error."""
    cursor = FrameCursor(IDS)
    cursor.feed({"meta_info": {"completion_tokens": 2, FRAME_KEY: [row(270), row(271)], "finish_reason": None}})
    with pytest.raises(ValueError, match="cumulative"):
        cursor.feed({"meta_info": {"completion_tokens": 3, FRAME_KEY: [row(272)], "finish_reason": None}})
