"""Serve any ``Synthesizer`` over the engine worker RPC (``engine.rpc``): the compute side of a worker pool.

    server = WorkerServer(engine, WorkerConfig(worker_id="w0"))
    host, port = await server.start("127.0.0.1", 0)
    ...
    await server.stop()            # refuse new work, let requests in flight finish (bounded), close

One task per connection reads frames; each ``submit`` runs in a task of its own that pulls a chunk from the engine
only while it holds a credit from the client, so a paused consumer pauses its own request and no other. Frames of
all requests share the connection through one writer lock; a client that stops reading its socket for
``send_timeout_s`` is dropped. A closed connection cancels its requests (the engine stops at its next step).
Registration in a registry (Redis) is not done here: see ``realtime.worker_process``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from engine.base import EngineError, SynthesisRequest, Synthesizer, engine_stats
from engine.rpc import (
    MAX_FRAME,
    MAX_WINDOW,
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
    read_message,
    write_message,
)

__all__ = ["WorkerConfig", "WorkerServer"]

log = logging.getLogger("shoal.worker")


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    max_frame: int = MAX_FRAME  # largest frame accepted, bytes
    max_requests: int = 256  # requests in flight per connection
    send_timeout_s: float = 30.0  # a client that takes no bytes for this long is dropped
    drain_timeout_s: float = 10.0  # stop(): how long requests in flight may run on

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        if not 1024 <= self.max_frame <= 1 << 31:
            raise ValueError("max_frame must be within [1024, 2**31]")
        if self.max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        if self.send_timeout_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("timeouts must be positive")


class _Credit:
    """Chunks the client will still take for one request."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._more = asyncio.Event()

    async def take(self) -> None:
        while self.n <= 0:
            self._more.clear()
            await self._more.wait()
        self.n -= 1

    def give(self, n: int) -> None:
        self.n += n
        self._more.set()


@dataclass
class _Active:
    task: asyncio.Task[None] | None = None
    credit: _Credit = field(default_factory=lambda: _Credit(0))
    cancelled: bool = False  # by the client: answer done(cancelled)
    shutdown: bool = False  # by stop(): answer error(unavailable)


@dataclass
class _Counters:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    refused: int = 0
    chunks: int = 0
    audio_s: float = 0.0
    voices: int = 0


class WorkerServer:
    """See the module docstring."""

    def __init__(self, engine: Synthesizer, config: WorkerConfig) -> None:
        self.engine = engine
        self.config = config
        self.counters = _Counters()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self.draining = False

    @property
    def load(self) -> int:
        """Requests in flight on all connections."""
        return sum(len(c.requests) for c in self._connections)

    def stats(self) -> dict[str, float]:
        """The engine's own stats plus this worker's counters (``worker_*``), for the registry and /metrics."""
        c = self.counters
        out = dict(engine_stats(self.engine))
        out.update(
            worker_requests_total=c.requests,
            worker_completed_total=c.completed,
            worker_cancelled_total=c.cancelled,
            worker_failed_total=c.failed,
            worker_refused_total=c.refused,
            worker_chunks_total=c.chunks,
            worker_audio_seconds_total=round(c.audio_s, 3),
            worker_voices_total=c.voices,
            worker_requests_active=self.load,
            worker_connections=len(self._connections),
        )
        return out

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen (port 0 picks a free one); returns the bound address."""
        self._server = await asyncio.start_server(self._accept, host, port, limit=1 << 16)
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop accepting; new submits get ``unavailable``; requests in flight may finish within the drain timeout,
        then the rest end with ``unavailable`` and every connection closes."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        timeout = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.load and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self._connections):
            await conn.close(shutdown=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection until it ends: a TCP one (``start``), or a pipe pair (``engine.rpc_process``)."""
        await self._accept(reader, writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.draining:
            writer.close()
            return
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)


class _Connection:
    def __init__(self, server: WorkerServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.engine = server.engine
        self.config = server.config
        self.reader = reader
        self.writer = writer
        self.requests: dict[int, _Active] = {}
        self._lock = asyncio.Lock()
        self._closed = False
        self._side: set[asyncio.Task[None]] = set()  # encode_voice calls

    async def run(self) -> None:
        peer = self.writer.get_extra_info("peername")
        try:
            await self.send(Hello(worker=self.config.worker_id, engine=self.engine.info, max_frame=self.config.max_frame))
            while True:
                try:
                    msg = await read_message(self.reader, self.config.max_frame)
                except RpcError as exc:
                    if exc.code == "protocol" or exc.request_id is None:
                        log.warning("closing the connection from %s: %s", peer, exc)
                        await self.send(Failed(None, "protocol", exc.message))
                        return
                    self._drop(exc.request_id)  # a malformed message about a request ends that request
                    await self.send(Failed(exc.request_id, exc.code, exc.message))
                    continue
                if msg is None or not await self._on_message(msg):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.info("connection from %s ended: %s", peer, type(exc).__name__)
        finally:
            await self.close()

    async def close(self, shutdown: bool = False) -> None:
        """End every request of this connection (each says goodbye if it still can), then close the socket."""
        tasks = list(self._side)
        for active in self.requests.values():
            active.shutdown = shutdown
            if active.task is not None:
                tasks.append(active.task)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if not self._closed:
            self._closed = True
            self.writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.writer.wait_closed()

    async def send(self, msg: Message) -> None:
        if self._closed:
            raise ConnectionError("connection closed")
        async with self._lock:
            write_message(self.writer, msg)
            try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races a result
                async with asyncio.timeout(self.config.send_timeout_s):
                    await self.writer.drain()
            except TimeoutError:
                log.warning("dropping a client that read nothing for %.0f s", self.config.send_timeout_s)
                self._closed = True
                self.writer.close()
                raise ConnectionError("client does not read") from None

    def _drop(self, rid: int) -> None:
        active = self.requests.pop(rid, None)
        if active is not None and active.task is not None:
            active.cancelled = True
            active.task.cancel()

    async def _on_message(self, msg: Message) -> bool:
        """Handle one message; False ends the connection."""
        if isinstance(msg, Submit):
            await self._submit(msg)
        elif isinstance(msg, Credit):
            active = self.requests.get(msg.id)
            if active is not None:  # else it already ended: a late credit is harmless
                active.credit.give(max(0, min(msg.n, MAX_WINDOW - active.credit.n)))  # capped
        elif isinstance(msg, Cancel):
            active = self.requests.get(msg.id)
            if active is not None and active.task is not None:
                active.cancelled = True
                active.task.cancel()
        elif isinstance(msg, EncodeVoice):
            task = asyncio.create_task(self._encode_voice(msg))
            self._side.add(task)
            task.add_done_callback(self._side.discard)
        elif isinstance(msg, Stats):
            health = "shutting down" if self.server.draining else self.engine.health()
            await self.send(Report(msg.id, self.server.stats(), health, self.server.load))
        elif isinstance(msg, Ping):
            await self.send(Pong())
        else:
            await self.send(Failed(None, "protocol", f"{msg.type} is not a message a worker takes"))
            return False
        return True

    async def _submit(self, msg: Submit) -> None:
        counters = self.server.counters
        reason = None
        if msg.id in self.requests:
            reason = ("bad_request", f"request id {msg.id} is already in flight")
        elif self.server.draining:
            reason = ("unavailable", f"worker {self.config.worker_id} is shutting down")
        elif len(self.requests) >= self.config.max_requests:
            reason = ("unavailable", f"worker {self.config.worker_id} has {len(self.requests)} requests in flight")
        elif (health := self.engine.health()) is not None:
            reason = ("unavailable", f"worker {self.config.worker_id}: engine {health}")
        if reason is not None:
            counters.refused += 1
            await self.send(Failed(msg.id, *reason))
            return
        counters.requests += 1
        active = _Active(credit=_Credit(msg.window))
        self.requests[msg.id] = active
        active.task = asyncio.create_task(self._run(msg.id, msg.request, msg.pcm, active))

    async def _run(self, rid: int, request: SynthesisRequest, pcm: str, active: _Active) -> None:
        counters = self.server.counters
        rate = self.engine.info.sample_rate
        stream = self.engine.synthesize(request)
        reply: Message
        try:
            try:
                while True:
                    await active.credit.take()  # before pulling: no credit, no compute
                    try:
                        chunk = await anext(stream)
                    except StopAsyncIteration:
                        break
                    await self.send(Frames(rid, chunk, pcm))
                    counters.chunks += 1
                    counters.audio_s += chunk.pcm.size / rate
                reply = Done(rid, "complete")
                counters.completed += 1
            except asyncio.CancelledError:
                if active.shutdown:
                    reply = Failed(rid, "unavailable", f"worker {self.config.worker_id} stopped")
                    counters.failed += 1
                else:
                    reply = Done(rid, "cancelled")
                    counters.cancelled += 1
            except EngineError as exc:
                reply = Failed(rid, "engine", str(exc))
                counters.failed += 1
            except Exception as exc:
                log.exception("request %d failed", rid)
                reply = Failed(rid, "internal", f"{type(exc).__name__}: {exc}")
                counters.failed += 1
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()  # type: ignore[attr-defined]
        finally:
            if self.requests.get(rid) is active:
                del self.requests[rid]
        if not self._closed:
            with contextlib.suppress(ConnectionError, OSError):
                await self.send(reply)

    async def _encode_voice(self, msg: EncodeVoice) -> None:
        try:
            codes = await self.engine.encode_voice(msg.pcm, msg.sample_rate, msg.text)
            reply: Message = VoiceReply(msg.id, codes)
            self.server.counters.voices += 1
        except (EngineError, ValueError) as exc:
            reply = Failed(msg.id, "engine" if isinstance(exc, EngineError) else "bad_request", str(exc))
        except Exception as exc:
            log.exception("encode_voice failed")
            reply = Failed(msg.id, "internal", f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(ConnectionError, OSError):
            await self.send(reply)
