"""Raw events: written as they happen (one msgpack array each), read back by the statistics step.

Every event is ``[kind, t, ...]`` with ``t`` in seconds since the run's start (the client's monotonic clock).
Kinds and their fields:

    conn   t sid                                       connecting
    open   t sid                                       WebSocket open
    ready  t sid frame_ms codec                        session.ready received
    turn   t sid k speaker text barge_after_ms context the client begins turn k (its plan), sending its first text
    send   t sid k what chars                          sent text / turn.end / cancel / playback (chars: text sent so far)
    ping   t sid rtt_ms                                a protocol ping answered by the gateway
    ts     t sid turn speaker context                  turn.started
    seg    t sid turn ms text context                  segment
    a      t sid turn seq ms nbytes context            audio
    w      t sid turn n first_ms estimated context     words (n words; first_ms: the first word's start_ms, None if n is 0)
    v      t sid turn n context                        visemes (n visemes)
    done   t sid turn reason audio_ms frames ttfa_ms underruns underrun_ms context
                                                       turn.done (+ the live player's counts)
    err    t sid code message fatal                    error from the server, or a client-side failure
    close  t sid why                                   the session ended (done | error | timeout | closed)
    floor  t probe rtt_ms                              a bare WebSocket round trip
    cpu    t server children client system server_wait client_wait gateways client_max
                                                       CPU %, 100 = one core (server: the gateway processes,
                                                       those of the server's tree listening on its port;
                                                       children: the rest of the tree, e.g. engine workers,
                                                       Redis; client: all load-generator processes, client_max
                                                       the busiest; *_wait: % of time an event loop waited for
                                                       a CPU, the most starved process's; gateways: how many;
                                                       see :mod:`loadtest.cpu`; the last two are missing in
                                                       runs from before several processes)
    lag    t ms                                        the client's event-loop lag (timer overshoot)

Telephony (``--telephony``, :mod:`loadtest.call`): a turn's ``a`` events are the call's ``media`` (seq counted by
the line, ms = seq * 20, no context), and the phone line adds

    call   t sid                                       the Media Stream opened (/v1/twilio)
    joined t sid                                       call.started reached the application
    utt    t sid k onset_ms clock_ms                   the caller's utterance: its first frame sent, over turn k;
                                                       its sound starts onset_ms in; clock_ms: where that frame is
                                                       on the input clock (20 ms per frame sent since joining)
    clear  t sid k                                     clear received: the call dropped turn k's audio
    vad    t sid started|stopped ms                    input.speech_started / input.speech_stopped (input clock ms)
    hungup t sid reason                                call.stopped reached the application
    line   t sid frames relayed marks_echoed           at the end: the caller's frames sent, input.audio relayed to
                                                       the application, marks echoed

``k`` is the session-wide turn index the client allocates as a turn's first text goes out (the server numbers
turns the same way). ``context`` is the context's wire id, ``None`` for the default context (one context per
session); on server messages it is what the server sent. Events recorded before contexts existed lack the
trailing ``context`` field; readers take a missing one as ``None``.

Packing happens inline (about a microsecond per event) into a buffer that is written out periodically, so
recording never stalls the event loop.

With several load-generator processes (``--client-processes``) every process records into a part file of its
own on the same clock (``t0`` is the parent's ``time.monotonic()``, which is system-wide), and :func:`merge` makes
them one ``events.msgpack``, ordered by time, each part's own order kept.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

EVENTS_FILE = "events.msgpack"
META_FILE = "meta.json"


class Recorder:
    def __init__(self, path: Path, t0: float | None = None) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._packer = msgpack.Packer(use_bin_type=True)
        self._buf = bytearray()
        self.t0 = time.monotonic() if t0 is None else t0  # the run's start (time.monotonic(), shared by processes)
        self.count = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, *fields: Any) -> None:
        self._buf += self._packer.pack(fields)
        self.count += 1

    def flush(self) -> None:
        if self._buf:
            self._file.write(self._buf)
            self._buf = bytearray()
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


def read_events(path: Path) -> Iterator[list[Any]]:
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, use_list=True, max_buffer_size=64 << 20)
        yield from unpacker


def merge(parts: list[Path], out: Path, chunk: int = 1 << 20) -> int:
    """Write the events of ``parts`` into ``out`` as one stream ordered by time (``heapq.merge``: each part's own
    order is kept, so every session's events stay in the order they were recorded). Returns the number of events."""
    packer = msgpack.Packer(use_bin_type=True)
    count = 0
    buf = bytearray()
    with open(out, "wb") as f:
        for ev in heapq.merge(*(read_events(p) for p in parts), key=lambda ev: ev[1]):
            buf += packer.pack(ev)
            count += 1
            if len(buf) >= chunk:
                f.write(buf)
                buf = bytearray()
        f.write(buf)
    return count
