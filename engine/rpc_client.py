"""The client side of the engine worker RPC (``engine.rpc``): one multiplexed connection to a worker.

    client = await WorkerClient.connect(host, port)      # or over any stream pair: WorkerClient.open(reader, writer)
    async for chunk in client.synthesize(request): ...   # credit-driven: at most ``window`` chunks wait
    codes = await client.encode_voice(pcm, rate, text)
    report = await client.stats()

The server side is ``engine.rpc_server``; the worker pool (``engine.pool``) holds one client per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from engine.base import AudioChunk, EngineError, SynthesisRequest
from engine.rpc import (
    MAX_FRAME,
    MAX_WINDOW,
    RPC_VERSION,
    Cancel,
    Credit,
    Done,
    EncodeVoice,
    Failed,
    Frames,
    Hello,
    Message,
    Ping,
    Pong,
    Report,
    RpcError,
    Stats,
    Submit,
    VoiceReply,
    encode,
    frame,
    read_message,
)

__all__ = ["ClientConfig", "WorkerClient", "WorkerLost", "WorkerStalled", "WorkerUnavailable"]

log = logging.getLogger("shoal.rpc")


@dataclass(frozen=True)
class ClientConfig:
    connect_timeout_s: float = 3.0  # TCP connect plus the worker's hello
    window: int = 4  # chunks in flight per request
    pcm: str = "f32"  # "f32" (exact) or "i16" (half the bytes)
    stall_timeout_s: float = 120.0  # nothing from the worker for a request that waits: give up
    call_timeout_s: float = 120.0  # encode_voice / stats
    ping_interval_s: float = 5.0
    dead_after_s: float = 20.0  # nothing at all received on a connection this long: it is dead

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "stall_timeout_s", "call_timeout_s", "ping_interval_s", "dead_after_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 1 <= self.window <= MAX_WINDOW:
            raise ValueError(f"window must be within [1, {MAX_WINDOW}]")
        if self.pcm not in ("f32", "i16"):
            raise ValueError("pcm must be f32 or i16")
        if self.dead_after_s <= self.ping_interval_s:
            raise ValueError("dead_after_s must exceed ping_interval_s")


class WorkerLost(EngineError):
    """The connection to a worker failed or broke."""


class WorkerStalled(EngineError):
    """A request got nothing from its worker for ``stall_timeout_s`` (the worker may be hung)."""


class WorkerUnavailable(EngineError):
    """The worker refused the request (shutting down, engine not ready, full): another worker may take it."""


_END = object()


class WorkerClient:
    """One multiplexed connection to a worker. Open with ``await WorkerClient.connect(host, port)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: Hello,
                 config: ClientConfig) -> None:
        self.reader = reader
        self.writer = writer
        self.worker = hello.worker
        self.info = hello.engine
        self.max_frame = hello.max_frame
        self.config = config
        self.closed = False
        self.error: str | None = None
        self.received = 0  # audio chunks received on this connection
        self._ids = itertools.count(1)
        self._streams: dict[int, asyncio.Queue[object]] = {}
        self._calls: dict[int, asyncio.Future[Message]] = {}
        self._lock = asyncio.Lock()
        self._last_rx = time.monotonic()
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._keepalive())]

    @classmethod
    async def connect(cls, host: str, port: int, config: ClientConfig | None = None) -> WorkerClient:
        """Raises ``WorkerLost`` if the worker cannot be reached or does not speak RPC v1."""
        config = config or ClientConfig()
        try:
            async with asyncio.timeout(config.connect_timeout_s):
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
        except (OSError, TimeoutError) as exc:
            raise WorkerLost(f"cannot reach engine worker at {host}:{port}: {type(exc).__name__}: {exc}") from None
        return await cls.open(reader, writer, config, where=f"{host}:{port}")

    @classmethod
    async def open(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: ClientConfig,
                   *, where: str, timeout_s: float | None = None) -> WorkerClient:
        """A client over an open stream pair: waits (``timeout_s``, default ``connect_timeout_s``) for the worker's
        ``hello``. Raises ``WorkerLost`` (with the worker's own message if it said why it cannot serve)."""
        try:
            async with asyncio.timeout(config.connect_timeout_s if timeout_s is None else timeout_s):
                hello = await read_message(reader, MAX_FRAME)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, RpcError) as exc:
            writer.close()
            raise WorkerLost(f"cannot reach engine worker at {where}: {type(exc).__name__}: {exc}") from None
        if hello is None:
            writer.close()
            raise WorkerLost(f"engine worker at {where} closed the connection (shutting down?)")
        if isinstance(hello, Failed):
            writer.close()
            raise WorkerLost(f"engine worker at {where} cannot serve: {hello.message}")
        if not isinstance(hello, Hello) or hello.version != RPC_VERSION:
            writer.close()
            raise WorkerLost(f"{where} is not an engine worker speaking RPC v{RPC_VERSION}")
        return cls(reader, writer, hello, config)

    @property
    def in_flight(self) -> int:
        return len(self._streams) + len(self._calls)

    # ---- requests

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        """Stream one request. Raises ``WorkerLost`` / ``WorkerUnavailable`` / ``EngineError``."""
        rid = next(self._ids)
        window = self.config.window
        queue: asyncio.Queue[object] = asyncio.Queue()  # at most `window` chunks: the worker keeps to its credit
        self._streams[rid] = queue
        finished = False
        try:
            await self._send(Submit(rid, request, window, self.config.pcm))
            owed = 0
            while True:
                try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races a result
                    async with asyncio.timeout(self.config.stall_timeout_s):
                        item = await queue.get()
                except TimeoutError:
                    raise WorkerStalled(
                        f"engine worker {self.worker} sent nothing for {self.config.stall_timeout_s:g} s"
                    ) from None
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                assert isinstance(item, AudioChunk)
                yield item
                owed += 1
                if owed * 2 >= window:  # acknowledge in halves of the window: few messages, no stalls
                    await self._send(Credit(rid, owed))
                    owed = 0
        finally:
            self._streams.pop(rid, None)
            if not finished and not self.closed:
                with contextlib.suppress(Exception):
                    self.writer.write(frame(encode(Cancel(rid))))  # no drain: it is tiny and must not block here

    async def encode_voice(self, pcm: np.ndarray, sample_rate: int, text: str) -> np.ndarray | None:
        reply = await self._call(lambda rid: EncodeVoice(rid, np.asarray(pcm, dtype=np.float32), sample_rate, text))
        assert isinstance(reply, VoiceReply)
        return reply.codes

    async def stats(self) -> Report:
        reply = await self._call(Stats)
        assert isinstance(reply, Report)
        return reply

    async def aclose(self) -> None:
        self._fail(WorkerLost(f"connection to engine worker {self.worker} closed"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- internals

    async def _call(self, make: Callable[[int], Message]) -> Message:
        rid = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._calls[rid] = future
        try:
            await self._send(make(rid))
            async with asyncio.timeout(self.config.call_timeout_s):
                reply = await future
        except TimeoutError:
            raise EngineError(f"engine worker {self.worker} did not answer in {self.config.call_timeout_s:.0f} s") from None
        finally:
            self._calls.pop(rid, None)
        if isinstance(reply, Failed):
            raise _error(self.worker, reply)
        return reply

    async def _send(self, msg: Message) -> None:
        if self.closed:
            raise WorkerLost(f"connection to engine worker {self.worker} is closed: {self.error}")
        data = frame(encode(msg))
        if len(data) > self.max_frame:
            raise EngineError(f"{msg.type} of {len(data)} bytes exceeds the worker's frame limit ({self.max_frame})")
        try:
            async with self._lock:
                self.writer.write(data)
                async with asyncio.timeout(self.config.dead_after_s):
                    await self.writer.drain()
        except (OSError, TimeoutError) as exc:
            self._fail(WorkerLost(f"engine worker {self.worker}: send failed: {type(exc).__name__}"))
            raise WorkerLost(f"engine worker {self.worker}: connection lost") from None

    async def _read_loop(self) -> None:
        reason = "closed the connection"
        try:
            while True:
                msg = await read_message(self.reader, 1 << 31)
                self._last_rx = time.monotonic()
                if msg is None:
                    break
                self._dispatch(msg)
        except (OSError, asyncio.IncompleteReadError) as exc:
            reason = f"connection lost ({type(exc).__name__})"
        except RpcError as exc:
            reason = f"protocol error: {exc}"
            log.error("engine worker %s: %s", self.worker, exc)
        self._fail(WorkerLost(f"engine worker {self.worker} {reason}"))

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, Frames):
            queue = self._streams.get(msg.id)
            if queue is not None:  # else cancelled here: frames in flight are dropped
                if queue.qsize() >= self.config.window:
                    raise RpcError("protocol", f"request {msg.id}: frames beyond the credit window")
                queue.put_nowait(msg.chunk)
                self.received += 1
        elif isinstance(msg, Done):
            queue = self._streams.get(msg.id)
            if queue is not None:
                queue.put_nowait(_END)
        elif isinstance(msg, Failed):
            if msg.id is None:
                self._fail(WorkerLost(f"engine worker {self.worker} closed the connection: {msg.message}"))
                return
            queue = self._streams.get(msg.id)
            if queue is not None:
                queue.put_nowait(_error(self.worker, msg))
            elif (future := self._calls.get(msg.id)) is not None and not future.done():
                future.set_result(msg)
        elif isinstance(msg, (VoiceReply, Report)):
            future = self._calls.get(msg.id)
            if future is not None and not future.done():
                future.set_result(msg)
        elif isinstance(msg, Pong):
            pass
        else:
            raise RpcError("protocol", f"unexpected {msg.type} from the worker")

    async def _keepalive(self) -> None:
        interval = self.config.ping_interval_s
        while not self.closed:
            await asyncio.sleep(interval)
            if time.monotonic() - self._last_rx > self.config.dead_after_s:
                self._fail(WorkerLost(f"engine worker {self.worker} silent for {self.config.dead_after_s:.0f} s"))
                return
            with contextlib.suppress(EngineError):
                await self._send(Ping())

    def _fail(self, exc: EngineError) -> None:
        """The connection is over: every request on it ends with ``exc``."""
        if self.closed:
            return
        self.closed = True
        self.error = str(exc)
        for queue in self._streams.values():
            queue.put_nowait(exc)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(exc)
        self.writer.close()


def _error(worker: str, msg: Failed) -> EngineError:
    text = f"engine worker {worker}: {msg.message}"
    if msg.code == "unavailable":
        return WorkerUnavailable(text)
    if msg.code == "bad_request":
        return EngineError(f"{text} (bad request)")
    return EngineError(text)


