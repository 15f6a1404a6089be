"""The built-in CPU voice: espeak-ng in a pool of worker processes, streamed chunk by chunk.

espeak-ng is not thread-safe, so each worker (:mod:`engine.espeak_process`) is a subprocess that synthesizes one
request at a time; requests wait for a free worker. Audio flows under credit-based flow control: a worker has
at most ``window`` chunks in flight, and the parent acknowledges each chunk as the consumer pulls it, so a
consumer that stops pulling stops espeak-ng. Closing the iterator cancels the utterance mid-word and hands the
worker to the next request within milliseconds. A worker that dies or stops answering fails its request with
EngineError and is replaced; the pool stays usable.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import re
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from engine.base import AudioChunk, EngineError, EngineInfo, SynthesisRequest
from engine.espeak_voice import Segment, plan_segments, timing_from_events
from engine.espeak_process import MAX_FRAME, encode_frame

__all__ = ["SAMPLE_RATE", "EspeakConfig", "EspeakStats", "EspeakSynthesizer"]

log = logging.getLogger(__name__)

SAMPLE_RATE = 22050  # espeak-ng's native rate
_FRAMES_PER_SECOND = 21.5  # Sampling.max_frames counts codec frames of 1000 / 21.5 ms
_HEADER = struct.Struct(">I")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the directory that holds the `engine` package
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[a-z0-9]{1,8})*")


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class EspeakConfig:
    workers: int = field(default_factory=_default_workers)  # processes, i.e. concurrent utterances
    language: str = "en-us"  # espeak-ng voice (language) the timbres are variants of
    buffer_ms: int = 20  # espeak-ng callback buffer (espeak-ng itself never goes below 60 ms)
    # most un-acknowledged chunks (~60 ms each) a worker may have in flight: ~15 s, so a worker finishes a segment
    # and goes back to the pool at once instead of being held for the paced playback of its utterance; the
    # window still bounds the run-ahead, and a cancel still stops espeak-ng mid-word
    window: int = 256
    start_timeout_s: float = 10.0  # for a worker process to come up
    stall_timeout_s: float = 5.0  # a working worker silent this long is considered hung
    cancel_timeout_s: float = 1.0  # for a worker to confirm a cancel before it is killed

    def __post_init__(self) -> None:
        for name, low, high in (("workers", 1, 64), ("buffer_ms", 1, 1000), ("window", 1, 4096)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
                raise ValueError(f"{name} must be an integer within [{low}, {high}]")
        if not (isinstance(self.language, str) and _LANGUAGE.fullmatch(self.language)):
            raise ValueError("language must be an espeak-ng language name such as 'en-us'")
        for name in ("start_timeout_s", "stall_timeout_s", "cancel_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and 0 < value <= 600):
                raise ValueError(f"{name} must be a number of seconds within (0, 600]")


@dataclass(frozen=True)
class EspeakStats:
    workers: int  # live worker processes
    busy: int  # of which serving a request
    chunks_received: int  # audio chunks received from workers since start
    restarts: int  # workers replaced after dying or hanging


class _End(enum.Enum):
    DONE = "done"  # the worker finished the request (Item.error may say it failed)
    LOST = "lost"  # the worker process died or broke the protocol
    CLOSED = "closed"  # the engine is shutting down


@dataclass(frozen=True)
class _Item:
    pcm: bytes = b""
    events: tuple[Any, ...] = ()  # espeak-ng's word and phoneme events (engine.espeak_process)
    end: _End | None = None
    error: str | None = None


class _Stream:
    """One request on one worker: the items the worker sent for it, in order."""

    def __init__(self, request_id: int) -> None:
        self.id = request_id
        self.items: asyncio.Queue[_Item] = asyncio.Queue()  # bounded by the worker's window


class _Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, proc: asyncio.subprocess.Process, engine: EspeakSynthesizer) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._engine = engine
        self._next_id = 0
        self.stream: _Stream | None = None
        self.alive = True
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def spawn(cls, engine: EspeakSynthesizer) -> _Worker:
        config = engine.config
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.espeak_process",
                "--buffer-ms", str(config.buffer_ms), "--window", str(config.window), "--language", config.language,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=_PACKAGE_ROOT,
            )
        except OSError as exc:
            raise EngineError(f"cannot start an espeak worker: {exc}") from exc
        worker = cls(proc, engine)
        try:
            async with asyncio.timeout(config.start_timeout_s):
                hello = await worker._read()
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, msgpack.UnpackException) as exc:
            await worker.close(kill=True)
            reason = "timed out" if isinstance(exc, TimeoutError) else f"exited with code {proc.returncode}"
            raise EngineError(f"espeak worker did not start: {reason}") from exc
        except BaseException:
            await worker.close(kill=True)
            raise
        if hello.get("t") != "ready" or hello.get("sample_rate") != SAMPLE_RATE:
            await worker.close(kill=True)
            detail = hello.get("message") if hello.get("t") == "fatal" else f"unexpected greeting {hello!r}"
            raise EngineError(f"espeak worker did not start: {detail}")
        worker._reader = asyncio.create_task(worker._read_loop(), name=f"espeak-worker-{worker.pid}")
        return worker

    async def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        (size,) = _HEADER.unpack(await self.proc.stdout.readexactly(_HEADER.size))
        if size > MAX_FRAME:
            raise ValueError(f"frame of {size} bytes is over {MAX_FRAME}")
        message = msgpack.unpackb(await self.proc.stdout.readexactly(size), raw=False)
        if not isinstance(message, dict):
            raise ValueError("frame is not a map")
        return message

    async def _read_loop(self) -> None:
        reason = "exited"
        try:
            while True:
                message = await self._read()
                stream = self.stream
                if stream is None or message.get("id") != stream.id:
                    continue  # left over from an earlier request
                if message.get("t") == "audio":
                    self._engine._chunks_received += 1
                    stream.items.put_nowait(_Item(pcm=bytes(message["pcm"]), events=tuple(message.get("ev", ()))))
                elif message.get("t") == "done":
                    self.stream = None
                    stream.items.put_nowait(_Item(events=tuple(message.get("ev", ())), end=_End.DONE,
                                                  error=message.get("error")))
        except asyncio.IncompleteReadError:
            reason = "exited"
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            reason = f"broke the protocol ({exc!r})"
        self.alive = False
        code = await self.proc.wait() if reason == "exited" else None
        if self.stream is not None:
            detail = f"exited with code {code}" if code is not None else reason
            self.stream.items.put_nowait(_Item(end=_End.LOST, error=f"espeak worker {self.pid} {detail}"))
            self.stream = None

    def _send(self, message: dict[str, Any]) -> None:
        if self.alive and self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.write(encode_frame(message))

    def begin(self, segments: list[Segment]) -> _Stream:
        assert self.stream is None, "a worker serves one request at a time"
        self._next_id += 1
        stream = _Stream(self._next_id)
        if not self.alive:  # died after it was handed out; the reader has already reported on its last stream
            stream.items.put_nowait(_Item(end=_End.LOST, error=f"espeak worker {self.pid} exited"))
            return stream
        self.stream = stream
        self._send({"t": "synth", "id": stream.id, "segments": [s.to_wire() for s in segments]})
        return stream

    def ack(self, stream: _Stream) -> None:
        self._send({"t": "ack", "id": stream.id, "n": 1})

    def cancel(self, stream: _Stream) -> None:
        self._send({"t": "cancel", "id": stream.id})

    def interrupt(self) -> None:
        """End the current stream now (engine shutdown)."""
        if self.stream is not None:
            self.stream.items.put_nowait(_Item(end=_End.CLOSED))
            self.stream = None

    async def close(self, kill: bool = False, grace_s: float = 1.0) -> None:
        """Stop the process (politely unless ``kill``: a closed stdin makes it exit) and reap it."""
        self.alive = False
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        if kill and self.proc.returncode is None:
            self.proc.kill()
        try:
            async with asyncio.timeout(grace_s):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


class _Slot:
    """A place in the pool; holds a worker, or None while there is none (it is spawned on demand)."""

    def __init__(self) -> None:
        self.worker: _Worker | None = None


class EspeakSynthesizer:
    """espeak-ng behind the Synthesizer interface; see the module docstring."""

    info = EngineInfo(name="espeak", sample_rate=SAMPLE_RATE, cloning=False, timing=True)

    def __init__(self, config: EspeakConfig | None = None) -> None:
        self.config = config or EspeakConfig()
        self._slots = [_Slot() for _ in range(self.config.workers)]
        self._idle: asyncio.Queue[_Slot] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self._last_error: str | None = None
        self._chunks_received = 0
        self._restarts = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        results = await asyncio.gather(*(_Worker.spawn(self) for _ in self._slots), return_exceptions=True)
        for slot, result in zip(self._slots, results):
            if isinstance(result, _Worker):
                slot.worker = result
            elif isinstance(result, EngineError):
                self._last_error = str(result)
                log.warning("%s", result)
            else:
                raise result
            self._idle.put_nowait(slot)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = [slot.worker for slot in self._slots if slot.worker is not None]
        for worker in workers:
            worker.interrupt()
        await asyncio.gather(*(worker.close() for worker in workers))
        for slot in self._slots:  # wakes requests waiting for a worker: they see the engine closed
            self._idle.put_nowait(slot)

    def health(self) -> str | None:
        if not self._started:
            return "not started"
        if self._closed:
            return "closed"
        if self._last_error is not None and not any(s.worker is not None and s.worker.alive for s in self._slots):
            return f"no espeak worker can be started: {self._last_error}"
        return None

    def stats(self) -> EspeakStats:
        live = [s.worker for s in self._slots if s.worker is not None and s.worker.alive]
        return EspeakStats(
            workers=len(live),
            busy=sum(1 for w in live if w.stream is not None),
            chunks_received=self._chunks_received,
            restarts=self._restarts,
        )

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and tests)."""
        return [s.worker.pid for s in self._slots if s.worker is not None and s.worker.alive]

    async def encode_voice(self, pcm: np.ndarray, sample_rate: int, text: str) -> np.ndarray | None:
        return None

    # -- synthesis ---------------------------------------------------------------------------------------------

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        if not self._started or self._closed:
            raise EngineError(f"espeak engine is {'closed' if self._closed else 'not started'}")
        segments = plan_segments(request, self.config.language)
        if not segments:
            return
        budget = int(request.sampling.max_frames * SAMPLE_RATE / _FRAMES_PER_SECOND)  # samples
        slot = await self._acquire()
        worker = slot.worker
        assert worker is not None
        stream = worker.begin(segments)
        end: _End | None = None
        # one chunk is held back, so the last one can carry the timing, which is complete only at the end
        held: np.ndarray | None = None
        events: list[Any] = []
        made = 0  # samples
        try:
            while True:
                try:
                    async with asyncio.timeout(self.config.stall_timeout_s):
                        item = await stream.items.get()
                except TimeoutError:
                    raise EngineError(f"espeak worker {worker.pid} stopped answering") from None
                events.extend(item.events)
                if item.end is not None:
                    end = item.end
                    if item.error is not None:
                        raise EngineError(item.error)
                    if held is not None:
                        yield AudioChunk(pcm=held, timing=timing_from_events(segments, events, made))
                    return
                worker.ack(stream)
                pcm = np.frombuffer(item.pcm, dtype="<i2")[:budget].astype(np.float32) / np.float32(32768.0)
                budget -= pcm.size
                made += pcm.size
                if pcm.size:
                    if held is not None:
                        # what is known so far: a barge-in before the end still cuts the turn at a word
                        news = any(e[0] == "w" for e in item.events)
                        so_far = timing_from_events(segments, events, made, complete=False) if news else None
                        yield AudioChunk(pcm=held, timing=so_far)
                    held = pcm
                if budget <= 0:  # max_frames reached: the finally below cancels the rest
                    if held is not None:
                        yield AudioChunk(pcm=held, timing=timing_from_events(segments, events, made, ended=False))
                    return
        finally:
            self._release(slot, worker, stream, end)

    async def _acquire(self) -> _Slot:
        slot = await self._idle.get()
        try:
            if self._closed:
                raise EngineError("espeak engine is closed")
            if slot.worker is None or not slot.worker.alive:
                if slot.worker is not None:  # died while idle
                    await slot.worker.close(kill=True)
                    slot.worker = None
                    self._restarts += 1
                slot.worker = await _Worker.spawn(self)
                self._last_error = None
        except EngineError as exc:
            self._last_error = str(exc)
            self._idle.put_nowait(slot)
            raise
        except BaseException:
            self._idle.put_nowait(slot)
            raise
        return slot

    def _release(self, slot: _Slot, worker: _Worker, stream: _Stream, end: _End | None) -> None:
        """Give the slot back; runs in the iterator's ``finally``, so it never awaits (tasks do the rest)."""
        if self._closed or end is _End.CLOSED:
            return
        if end is _End.DONE:
            self._idle.put_nowait(slot)
        elif end is _End.LOST or not worker.alive:
            self._spawn_task(self._replace(slot, worker))
        else:  # abandoned mid-stream (closed, cancelled, max_frames, or the worker hung)
            self._spawn_task(self._recover(slot, worker, stream))

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recover(self, slot: _Slot, worker: _Worker, stream: _Stream) -> None:
        """Cancel the worker's request and wait for it to confirm; a worker that does not is replaced."""
        worker.cancel(stream)
        try:
            async with asyncio.timeout(self.config.cancel_timeout_s):
                item = await stream.items.get()
                while item.end is None:  # audio made before the cancel arrived: dropped
                    item = await stream.items.get()
        except TimeoutError:
            item = _Item(end=_End.LOST)
        if item.end is _End.DONE:
            self._idle.put_nowait(slot)
        elif item.end is _End.LOST:
            await self._replace(slot, worker)

    async def _replace(self, slot: _Slot, worker: _Worker) -> None:
        """Kill a dead or hung worker and start a fresh one in its slot (or leave it empty to retry later)."""
        try:
            await worker.close(kill=True)
            slot.worker = None
            self._restarts += 1
            slot.worker = await _Worker.spawn(self)
            self._last_error = None
        except EngineError as exc:
            self._last_error = str(exc)
            log.warning("%s", exc)
        finally:
            if not self._closed:
                self._idle.put_nowait(slot)
