"""The built-in CPU voice: espeak-ng in a pool of worker processes, streamed chunk by chunk.

espeak-ng is not thread-safe, so each worker (:mod:`engine.espeak_process`) is a process that says one utterance at
a time; requests wait for a free worker. Each worker is an engine served over the worker RPC on its stdin/stdout
(``engine.rpc_process``): the same framing and credit window as the worker pool's, so a worker has at most
``window`` chunks in flight and makes more only as the consumer pulls them (a consumer that stops pulling stops
espeak-ng). The worker plans the request, speaks it and reports its word timing; this side routes requests to
free workers and replaces a worker that dies or stops answering (its request fails with EngineError; the pool stays
usable), when the restart policy of every out-of-process engine says (``engine.supervisor``: after 0.1 s, doubling up
to 5 s while a slot's workers keep failing young; the reason logged once; restarts counted). Closing the iterator
cancels the utterance mid-word; the worker takes the next request within milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
import numpy as np

from engine.base import AudioChunk, EngineError, EngineInfo, SynthesisRequest
from engine.espeak_voice import SAMPLE_RATE, plan_segments
from engine.rpc import MAX_WINDOW
from engine.rpc_client import ClientConfig, WorkerLost, WorkerStalled
from engine.rpc_process import RpcProcess
from engine.supervisor import Backoff, Supervisor

__all__ = ["SAMPLE_RATE", "EspeakConfig", "EspeakStats", "EspeakSynthesizer"]

log = logging.getLogger(__name__)

_LANGUAGE = re.compile(r"[a-z]{2,3}(-[a-z0-9]{1,8})*")
_BACKOFF = Backoff(first_s=0.1, max_s=5.0, settled_s=10.0)  # a worker starts in ~0.1 s: replace it about as fast


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

    def __post_init__(self) -> None:
        for name, low, high in (("workers", 1, 64), ("buffer_ms", 1, 1000), ("window", 1, MAX_WINDOW)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
                raise ValueError(f"{name} must be an integer within [{low}, {high}]")
        if not (isinstance(self.language, str) and _LANGUAGE.fullmatch(self.language)):
            raise ValueError("language must be an espeak-ng language name such as 'en-us'")
        for name in ("start_timeout_s", "stall_timeout_s"):
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


class _Slot:
    """A place in the pool; holds a worker process, or None while there is none (it is spawned on demand)."""

    def __init__(self, index: int) -> None:
        self.index = index  # the slot's index in the restart policy
        self.worker: RpcProcess | None = None


class EspeakSynthesizer:
    """espeak-ng behind the Synthesizer interface; see the module docstring."""

    info = EngineInfo(name="espeak", sample_rate=SAMPLE_RATE, cloning=False, timing=True)

    def __init__(self, config: EspeakConfig | None = None) -> None:
        self.config = config or EspeakConfig()
        self._client_config = ClientConfig(window=self.config.window, stall_timeout_s=self.config.stall_timeout_s)
        self._slots = [_Slot(i) for i in range(self.config.workers)]
        self._supervisor = Supervisor("espeak worker {slot}", self.config.workers, _BACKOFF, say=log.warning)
        self._idle: asyncio.Queue[_Slot] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self._busy = 0
        self._received_before = 0  # chunks received by workers since replaced

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        results = await asyncio.gather(*(self._spawn() for _ in self._slots), return_exceptions=True)
        for slot, result in zip(self._slots, results, strict=True):
            if isinstance(result, RpcProcess):
                slot.worker = result
                self._supervisor.started(slot.index)
            elif isinstance(result, EngineError):
                self._supervisor.failed(slot.index, f"could not start: {result}")
            else:
                raise result
            self._idle.put_nowait(slot)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._supervisor.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = [slot.worker for slot in self._slots if slot.worker is not None]
        await asyncio.gather(*(worker.close() for worker in workers))
        for slot in self._slots:  # wakes requests waiting for a worker: they see the engine closed
            self._idle.put_nowait(slot)

    def health(self) -> str | None:
        if not self._started:
            return "not started"
        if self._closed:
            return "closed"
        failure = self._supervisor.last_failure  # None once a worker has started since the latest failure
        if failure is not None and not any(s.worker is not None and s.worker.alive for s in self._slots):
            return f"no espeak worker is running: {failure}"
        return None

    def stats(self) -> EspeakStats:
        live = [s.worker for s in self._slots if s.worker is not None and s.worker.alive]
        received = self._received_before + sum(s.worker.client.received for s in self._slots if s.worker is not None)
        return EspeakStats(workers=len(live), busy=self._busy, chunks_received=received,
                           restarts=self._supervisor.restarts)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and tests)."""
        return [s.worker.pid for s in self._slots if s.worker is not None and s.worker.alive]

    async def encode_voice(self, pcm: np.ndarray, sample_rate: int, text: str) -> np.ndarray | None:
        return None

    # -- synthesis ---------------------------------------------------------------------------------------------

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        if not self._started or self._closed:
            raise EngineError(f"espeak engine is {'closed' if self._closed else 'not started'}")
        if not plan_segments(request, self.config.language):
            return
        slot = await self._acquire()
        worker = slot.worker
        assert worker is not None
        self._busy += 1
        # The worker's audio is taken as fast as it comes (up to the window) and the worker goes back to the pool as
        # soon as it has said the request: a consumer that paces its audio to real time (the gateway, lead_ms ahead
        # of the listener) must not hold a worker for the seconds the utterance lasts, or a few sessions would
        # queue everyone else. A consumer that stops pulling still stops espeak-ng once the window is full.
        queue: asyncio.Queue[AudioChunk | EngineError | None] = asyncio.Queue(maxsize=self.config.window)

        async def drain() -> None:
            hung = False
            stream = worker.client.synthesize(request)
            try:
                async for chunk in stream:
                    await queue.put(chunk)
                await queue.put(None)
            except WorkerStalled:
                hung = True
                await queue.put(EngineError(f"espeak worker {worker.pid} stopped answering"))
            except WorkerLost as exc:  # (the engine closed under this stream: it ends quietly)
                await queue.put(None if self._closed else EngineError(f"espeak worker {worker.pid} is gone: {exc}"))
            finally:
                await stream.aclose()  # cancels the request over the RPC if it was cut short
                self._busy -= 1
                self._release(slot, replace=hung or not worker.alive, hung=hung)

        task = asyncio.get_running_loop().create_task(drain(), name=f"espeak-{worker.pid}")
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, EngineError):
                    raise item
                yield item
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _spawn(self) -> RpcProcess:
        config = self.config
        argv = [sys.executable, "-m", "engine.espeak_process", "--buffer-ms", str(config.buffer_ms),
                "--language", config.language]
        return await RpcProcess.spawn(argv, self._client_config, start_timeout_s=config.start_timeout_s)

    async def _acquire(self) -> _Slot:
        slot = await self._idle.get()
        try:
            if self._closed:
                raise EngineError("espeak engine is closed")
            if slot.worker is None or not slot.worker.alive:
                if slot.worker is not None:  # died while idle
                    await self._retire(slot, hung=False)
                await self._start(slot)
        except BaseException:
            self._idle.put_nowait(slot)
            raise
        return slot

    async def _start(self, slot: _Slot) -> None:
        """Start a worker in the empty ``slot`` once the restart policy allows. Raises EngineError if it does not
        come up (the policy says why) or the engine closed meanwhile."""
        await asyncio.sleep(self._supervisor.wait_s(slot.index))
        if self._closed:
            raise EngineError("espeak engine is closed")
        try:
            worker = await self._spawn()
        except EngineError as exc:
            self._supervisor.failed(slot.index, f"could not start: {exc}")
            raise
        if self._closed:  # aclose() did not see it: end it here
            await worker.close(kill=True)
            raise EngineError("espeak engine is closed")
        slot.worker = worker
        self._supervisor.started(slot.index)

    def _release(self, slot: _Slot, *, replace: bool, hung: bool) -> None:
        """Give the slot back; runs in the iterator's ``finally``, so it never awaits (a task replaces a worker).
        A request closed mid-stream was cancelled over the RPC: the worker aborts it before its next one."""
        if self._closed:
            return
        if not replace:
            self._idle.put_nowait(slot)
            return
        task = asyncio.get_running_loop().create_task(self._replace(slot, hung=hung))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retire(self, slot: _Slot, *, hung: bool) -> None:
        """End the slot's dead or hung worker and tell the restart policy why it went."""
        worker, slot.worker = slot.worker, None
        assert worker is not None
        self._received_before += worker.client.received
        await worker.close(kill=True)
        reason = "stopped answering" if hung else f"exited with code {worker.proc.returncode}"
        self._supervisor.failed(slot.index, reason, pid=worker.pid)

    async def _replace(self, slot: _Slot, *, hung: bool) -> None:
        """Kill a dead or hung worker and start a fresh one in its slot (or leave it empty to retry on demand)."""
        try:
            await self._retire(slot, hung=hung)
            await self._start(slot)
        except EngineError:
            pass  # the restart policy said why; the next request for this slot tries again
        finally:
            if not self._closed:
                self._idle.put_nowait(slot)
