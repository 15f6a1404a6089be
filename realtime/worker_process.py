"""Engine worker processes: ``shoal worker`` (one engine served over the worker RPC and registered in Redis) and
the supervisor behind ``shoal serve --workers N``.

This is process plumbing, and it lives in ``realtime/`` because it is the one package allowed to join ``engine/``
(the RPC server and the pool) with ``sessions/`` (the registry in Redis); the engine side stays ignorant of Redis
(``PoolEngine`` gets its live workers from the small ``RegistryMembers`` adapter below) and the registry ignorant
of engines. A worker process:

1. starts its engine (loads the weights), listens for the RPC (``--listen HOST:PORT``, port 0 picks a free one);
2. registers ``{id, host, port, pid, engine, load, health, stats}`` in the pool's registry and refreshes it every
   ``heartbeat_s`` (the key expires ``ttl_s`` after the last heartbeat: a killed worker drops out on its own);
3. prints ``shoal worker: <id> listening on <host>:<port> ...`` once it is registered (what the supervisor waits
   for);
4. on SIGTERM / SIGINT deregisters first (no new sessions come), lets requests in flight finish (bounded), closes.

``WorkerSupervisor`` starts N such processes on 127.0.0.1 in a pool of the gateway's own (``local-<host>-<pid>``),
waits until all are registered, forwards their output with a ``[w<i>]`` prefix, restarts one that dies (the restart
policy of every out-of-process engine, ``engine.supervisor``: backoff, the reason said once, a restart count; the
restarted process takes the same id, so its sessions come back to it) and stops them all on exit.
Configuration reaches workers only through their command line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from engine.base import Synthesizer
from engine.pool import PoolMember
from engine.rpc_server import WorkerConfig, WorkerServer
from engine.supervisor import Backoff, Supervisor
from sessions.store import StoreError
from sessions.registry import WorkerRecord, WorkerRegistry, check_name

__all__ = [
    "LocalWorkers",
    "RegistryMembers",
    "WorkerOptions",
    "WorkerStartError",
    "WorkerSupervisor",
    "local_pool_name",
    "run_worker",
]

log = logging.getLogger("shoal.workers")

READY = re.compile(r"^shoal worker: (\S+) listening on (\S+):(\d+)\b")
_REDIS_TIMEOUT_S = 2.0  # the registry's socket timeout


class RegistryMembers:
    """``engine.pool.MemberSource`` over the registry in Redis: the pool's live workers as ``PoolMember``s."""

    def __init__(self, registry: WorkerRegistry) -> None:
        self.registry = registry

    async def members(self) -> Sequence[PoolMember]:
        await self.registry.connect()  # idempotent; retried here after an outage at startup
        return [PoolMember(r.id, r.host, r.port, r.load, r.health, r.stats, r.started_at)
                for r in await self.registry.live()]

    async def aclose(self) -> None:
        await self.registry.aclose()


# ------------------------------------------------------------------------------------------------- shoal worker


@dataclass(frozen=True)
class WorkerOptions:
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str | None = None  # host to register (default: the bound one; the host name for a wildcard)
    redis_url: str | None = None  # None: do not register (a standalone RPC server)
    pool: str = "default"
    worker_id: str | None = None  # default: <hostname>-<pid>
    heartbeat_s: float = 1.0
    ttl_s: float = 4.0
    drain_timeout_s: float = 10.0
    parent_pid: int | None = None  # exit when this process is no longer our parent (supervised workers)

    def __post_init__(self) -> None:
        check_name(self.pool, "--pool")
        if self.worker_id is not None:
            check_name(self.worker_id, "--id")
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise ValueError("need 0 < heartbeat_s < ttl_s")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must not be negative")


def run_worker(engine: Synthesizer, options: WorkerOptions, out: TextIO = sys.stdout) -> int:
    """Serve ``engine`` until SIGTERM / SIGINT. Returns the exit code."""
    return asyncio.run(_worker(engine, options, out))


async def _worker(engine: Synthesizer, opts: WorkerOptions, out: TextIO) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker_id = opts.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    await engine.start()
    server = WorkerServer(engine, WorkerConfig(worker_id=worker_id, drain_timeout_s=opts.drain_timeout_s))
    host, port = await server.start(opts.host, opts.port)
    advertised = opts.advertise or (socket.gethostname() if host in ("0.0.0.0", "::") else host)
    started_at = time.time()

    def record() -> WorkerRecord:
        health = "shutting down" if server.draining else engine.health()
        return WorkerRecord(id=worker_id, host=advertised, port=port, pid=os.getpid(), engine=engine.info.to_wire(),
                            load=server.load, health=health, stats=server.stats(), started_at=started_at)

    registry = None
    tasks: list[asyncio.Task[None]] = []
    where = "not registered"
    if opts.redis_url is not None:
        registry = WorkerRegistry(opts.redis_url, pool=opts.pool, ttl_ms=int(opts.ttl_s * 1000),
                                  socket_timeout_s=_REDIS_TIMEOUT_S)
        try:
            await registry.connect()
            await registry.heartbeat(record())
            where = f"registered in pool {opts.pool}"
        except StoreError as exc:
            where = f"not yet registered in pool {opts.pool} (retrying): {exc}"
        tasks.append(asyncio.create_task(_heartbeats(registry, record, opts.heartbeat_s, stop)))
    if opts.parent_pid is not None:
        tasks.append(asyncio.create_task(_watch_parent(opts.parent_pid, stop)))
    info = engine.info
    print(f"shoal worker: {worker_id} listening on {advertised}:{port} (engine {info.name}, {info.sample_rate} Hz; "
          f"{where})", file=out, flush=True)
    try:
        await stop.wait()
    finally:
        # The helpers end by seeing `stop`, not by cancellation: redis-py's asyncio client can swallow a cancel
        # that lands mid-command (asyncio.wait_for on Python 3.11), and a heartbeat that survived its cancel
        # would register the worker again after it deregistered.
        stop.set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_REDIS_TIMEOUT_S + 1)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if registry is not None:
            with contextlib.suppress(StoreError, RuntimeError):
                await registry.deregister(worker_id)  # first: no new sessions come while we drain
        await server.stop()
        await engine.aclose()
        if registry is not None:
            await registry.aclose()
    return 0


async def _wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``event``; True if it is set."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()


async def _heartbeats(
    registry: WorkerRegistry, record: Callable[[], WorkerRecord], interval_s: float, stop: asyncio.Event
) -> None:
    failing = False
    while not await _wait_set(stop, interval_s):
        try:
            await registry.connect()
            await registry.heartbeat(record())
            if failing:
                log.warning("worker registry reachable again")
            failing = False
        except StoreError as exc:
            if not failing:
                log.warning("worker heartbeat failed (retrying every %.1f s): %s", interval_s, exc)
            failing = True


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    while not await _wait_set(stop, 0.5):
        if os.getppid() != parent_pid:
            log.warning("parent process %d is gone: stopping", parent_pid)
            stop.set()


# ------------------------------------------------------------------------------------- shoal serve --workers N


class WorkerStartError(RuntimeError):
    """A local worker did not come up (its last output is in the message)."""


def local_pool_name() -> str:
    """A pool of this gateway's own, so no other gateway on the same Redis routes to its loopback workers."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "host"
    return f"local-{host}-{os.getpid()}"


@dataclass(frozen=True)
class LocalWorkers:
    count: int
    engine_argv: tuple[str, ...] = ()  # engine options of `shoal worker` (--engine, --model, ...)
    pool: str = field(default_factory=local_pool_name)
    start_timeout_s: float = 300.0  # per worker: weights may take a while to load
    restart: bool = True
    verbose: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 64:
            raise ValueError("workers must be within 1..64")


@dataclass
class _Child:
    slot: int
    proc: subprocess.Popen[str]
    ready: threading.Event = field(default_factory=threading.Event)
    address: str | None = None
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=40))

    @property
    def worker_id(self) -> str:
        return f"w{self.slot}"


class WorkerSupervisor:
    """See the module docstring. ``start()`` blocks until every worker is registered; ``stop()`` ends them."""

    def __init__(self, spec: LocalWorkers, redis_url: str, log_to: TextIO = sys.stderr) -> None:
        self.spec = spec
        self.redis_url = redis_url
        self.log_to = log_to
        self.children: list[_Child] = []
        # restarts one that dies: after 1 s, doubling up to 30 s while they keep dying young
        self.policy = Supervisor("engine worker w{slot}", spec.count, Backoff(first_s=1.0, max_s=30.0),
                                 say=self._say)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None

    @property
    def restarts(self) -> int:
        return self.policy.restarts

    def command(self, slot: int) -> list[str]:
        cmd = [sys.executable, "-m", "realtime"] + (["-v"] if self.spec.verbose else [])
        return cmd + ["worker", "--listen", "127.0.0.1:0", "--redis", self.redis_url, "--pool", self.spec.pool,
                      "--id", f"w{slot}", "--parent-pid", str(os.getpid()), *self.spec.engine_argv]

    def start(self) -> None:
        self.children = [self._spawn(slot) for slot in range(self.spec.count)]
        deadline = time.monotonic() + self.spec.start_timeout_s
        for child in self.children:
            while not child.ready.wait(0.05):
                if child.proc.poll() is not None or time.monotonic() > deadline:
                    child.ready.wait(0.5)  # let the reader catch the last lines
                    self.stop()
                    what = f"exited with code {child.proc.returncode}" if child.proc.returncode is not None else (
                        f"did not start within {self.spec.start_timeout_s:.0f} s")
                    tail = "".join(child.lines).strip()
                    raise WorkerStartError(f"engine worker {child.worker_id} {what}" + (f":\n{tail}" if tail else ""))
        self._monitor = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._monitor.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every worker (they deregister and drain), then SIGKILL what is left after ``timeout_s``."""
        self._stopping.set()
        self.policy.stop()
        with self._lock:
            children = list(self.children)
        for child in children:
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(f"engine worker {child.worker_id} did not stop in {timeout_s:.0f} s: killing it")
                child.proc.kill()
                child.proc.wait()
        if self._monitor is not None:
            self._monitor.join(2.0)

    def _spawn(self, slot: int) -> _Child:
        proc = subprocess.Popen(
            self.command(slot),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # a Ctrl-C meant for the gateway does not hit workers mid-drain; stop() does
        )
        child = _Child(slot, proc)
        self.policy.started(slot)
        threading.Thread(target=self._read, args=(child,), name=f"worker-w{slot}-output", daemon=True).start()
        return child

    def _read(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        for line in child.proc.stdout:
            child.lines.append(line)
            m = READY.match(line)
            if m:
                child.address = f"{m.group(2)}:{m.group(3)}"
                child.ready.set()
            self._say(f"[{child.worker_id}] {line.rstrip()}")

    def _watch(self) -> None:
        """Restart workers that exit on their own, when the restart policy says (``engine.supervisor``)."""
        while not self._stopping.wait(0.1):
            if not self.spec.restart:
                continue
            for i, child in enumerate(list(self.children)):
                if child.proc.poll() is None:
                    continue
                if not self.policy.failing(i):
                    self.policy.failed(i, f"exited with code {child.proc.returncode}", pid=child.proc.pid)
                elif self.policy.wait_s(i) == 0:
                    with self._lock:
                        if self._stopping.is_set():
                            return
                        self.children[i] = self._spawn(child.slot)

    def _say(self, line: str) -> None:
        with contextlib.suppress(ValueError, OSError):  # the stream may be closed at exit
            print(line, file=self.log_to, flush=True)
