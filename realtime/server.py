"""Run the gateway under uvicorn with the embedded Redis, and shut both down gracefully.

On SIGTERM / Ctrl-C: stop accepting, tell every open session it is going away (``error`` + close 1001), wait
at most ``shutdown_timeout_s``, then let uvicorn stop; the embedded Redis is shut down last (it persists on
SHUTDOWN), so nothing already stored is lost.

With local workers (``serve --workers N``) the engine runs in N ``shoal worker`` processes that register in this
Redis; the gateway's engine is a ``PoolEngine`` over them. They start before the gateway listens and stop after it
has drained (before Redis). With ``worker_pool`` the gateway routes to workers started elsewhere (``shoal worker
--redis URL --pool NAME``) and starts none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import uvicorn

from engine.alignment import ProportionalAligner
from engine.base import Synthesizer
from engine.registry import make_engine
from realtime.app import create_app
from realtime.config import ServerConfig
from realtime.gateway import Gateway
from realtime.guards import GuardedEventLoop, handshake_guarded
from realtime.logs import rate_limit_handlers
from realtime.metrics import shared_counter
from realtime.processes import GatewayProcesses, gateway_spec, listening_socket, reserve_port
from realtime.worker_process import LocalWorkers, RegistryMembers, WorkerSupervisor
from sessions.embedded import EmbeddedRedis, default_data_dir, find_redis_server
from sessions.store import SessionStore
from sessions.registry import WorkerRegistry

log = logging.getLogger("shoal.server")


class _Server(uvicorn.Server):
    """uvicorn fails open WebSockets with 1012 on exit; drain ours first, with a proper goodbye."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, timeout_s: float, on_started: Callable[[], None],
                 signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)):
        super().__init__(config)
        self._gateway = gateway
        self._timeout_s = timeout_s
        self._drained = False
        self._on_started = on_started
        self._signals = signals

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[override]
        await super().startup(sockets)
        if self.started:
            self._on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Like uvicorn's, but without re-raising the signal afterwards: we still have the store to stop."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in self._signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def on_tick(self, counter: int) -> bool:
        if self.should_exit and not self._drained:
            self._drained = True
            await self._gateway.shutdown(self._timeout_s)
        return await super().on_tick(counter)


def serve(
    config: ServerConfig,
    engine: Synthesizer | None,
    out: TextIO = sys.stdout,
    *,
    workers: LocalWorkers | None = None,
    worker_pool: str | None = None,
    engine_factory: Callable[[], Synthesizer] | None = None,
    on_ready: Callable[[], None] | None = None,
    reuse_port: bool = False,
    verbose: bool = False,
) -> int:
    """Serve until a signal. Returns the process exit code.

    ``engine`` runs in process; or give ``workers`` (start local worker processes) or ``worker_pool`` (use the
    workers registered under that pool name) and ``engine=None``. Raises ``WorkerStartError`` if a local worker
    does not come up. With ``config.processes`` > 1 this process starts the gateways (realtime.processes) and
    serves nothing itself: give ``engine_factory`` (each gateway builds its own engine), or workers.
    ``reuse_port``: listen on a socket of our own with SO_REUSEPORT (one of several gateways; SIGINT is left to
    the parent). ``on_ready`` is called once listening.
    """
    if config.processes > 1:
        assert engine is None and (engine_factory is not None) != (workers is not None or worker_pool is not None)
    else:
        assert (engine is None) == (workers is not None or worker_pool is not None), "an engine, or workers"
    embedded: EmbeddedRedis | None = None
    supervisor: WorkerSupervisor | None = None
    redis_url = config.redis_url
    if redis_url is None:
        data_dir = config.data_dir or default_data_dir()
        binary = find_redis_server()
        embedded = EmbeddedRedis(data_dir, executable=binary)  # supervised: restarted within a second if it dies
        embedded.start()
        redis_url = embedded.url
        how = "adopted a running" if embedded.adopted else "started"
        store_desc = f"embedded Redis ({how} {binary}) persisting under {data_dir}"
    else:
        store_desc = f"Redis at {_redact(redis_url)}"
    try:
        pool_desc = ""
        if workers is not None:
            supervisor = WorkerSupervisor(workers, redis_url)
            supervisor.start()
            worker_pool = workers.pool
            addresses = ", ".join(f"{c.worker_id} at {c.address}" for c in supervisor.children)
            pool_desc = f"{workers.count} local engine workers in pool {workers.pool} ({addresses})"
        if config.processes > 1:
            return _serve_processes(config, redis_url, engine_factory, worker_pool, out, verbose,
                                    [f"store {store_desc}"] + ([f"workers: {pool_desc}"] if pool_desc else []),
                                    embedded)
        # one Redis connection pool for the process: the store's, connected and closed in the app's lifespan; the
        # worker registry the pool reads is a guest on it
        store = SessionStore(redis_url, session_ttl_s=config.session_ttl_s)
        if worker_pool is not None:
            engine = make_engine("pool", source=RegistryMembers(WorkerRegistry(store.redis, pool=worker_pool)))
            pool_desc = pool_desc or f"engine workers of pool {worker_pool}"
        assert engine is not None
        # estimated word timing for an engine without its own (S2 Pro): the built-in voice's, spread over its audio
        aligner = ProportionalAligner(make_engine("espeak", workers=min(2, os.cpu_count() or 1)))
        app = create_app(config, engine, store, None if embedded is None else lambda: embedded.status()._asdict(),
                         aligner=aligner)
        if embedded is not None:
            restarts = app.state.metrics.store_restarts
            embedded.on_restart = lambda status: restarts.inc()
        uv_config = uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            ws_max_size=config.limits.voice_message_bytes + (1 << 20),
            ws_per_message_deflate=False,  # Opus does not compress; deflate cost 16 % more CPU under load
            # a ping a second: its pong tells the gateway the client has read everything sent before it (see
            # realtime/liveness.py); the timeout is a backstop behind the gateway's own slow-reader rule
            ws_ping_interval=config.limits.liveness_ping_s,
            ws_ping_timeout=config.limits.send_timeout_s + 3.0,
            timeout_graceful_shutdown=2,
            lifespan="on",
            # a connection must finish its request head in time (uvicorn has no header timeout of its own)
            http=handshake_guarded(config.limits.handshake_timeout_s),
        )
        rate_limit_handlers([None, "uvicorn", "uvicorn.access"])  # after uvicorn.Config set its handlers up
        server: _Server

        def announce() -> None:
            port = server.servers[0].sockets[0].getsockname()[1] if server.servers else config.port
            assert engine is not None
            info = engine.info
            print(f"shoal: engine {info.name} ({info.sample_rate} Hz, cloning {'on' if info.cloning else 'off'})", file=out)
            if pool_desc:
                print(f"shoal: workers: {pool_desc}", file=out)
            print(f"shoal: store {store_desc}", file=out)
            print(_listening(config.host, port), file=out)
            out.flush()
            if on_ready is not None:
                on_ready()

        sockets = None
        signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
        if reuse_port:
            sockets, signals = [listening_socket(config.host, config.port)], (signal.SIGTERM,)
        server = _Server(uv_config, app.state.gateway, config.shutdown_timeout_s, announce, signals)
        with asyncio.Runner(loop_factory=GuardedEventLoop) as runner:  # backs off accepting when out of fds
            runner.run(server.serve(sockets=sockets))
        return 0 if server.started else 1
    finally:
        if supervisor is not None:
            supervisor.stop()
        if embedded is not None:
            embedded.stop()


def _serve_processes(config: ServerConfig, redis_url: str, engine_factory: Callable[[], Synthesizer] | None,
                     worker_pool: str | None, out: TextIO, verbose: bool, shared: list[str],
                     embedded: EmbeddedRedis | None) -> int:
    """The parent of ``config.processes`` gateways: hold the port, start them, restart any that dies, and on
    SIGINT/SIGTERM stop them (each drains). The store and workers are the caller's (started before, stopped after)."""
    holder = reserve_port(config.host, config.port)
    port = holder.getsockname()[1]
    metrics_dir = Path(tempfile.mkdtemp(prefix="shoal-metrics-"))
    if embedded is not None:  # the store is the parent's: so are its restarts, counted where the gateways read
        restarted = shared_counter(metrics_dir, "shoal_store_restarts")
        embedded.on_restart = lambda status: restarted()
    spec = gateway_spec(config, redis_url, port, metrics_dir, engine_factory, worker_pool, verbose)
    gateways = GatewayProcesses(spec, config.processes)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        gateways.start()
        print(f"shoal: {config.processes} gateway processes (pids {', '.join(map(str, gateways.pids))}) on one port",
              file=out)
        for line in shared:
            print(f"shoal: {line}", file=out)
        print(_listening(config.host, port), file=out)
        out.flush()
        gateways.supervise(stop)
        return 0
    finally:
        gateways.stop(config.shutdown_timeout_s + 10.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        holder.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _listening(host: str, port: int) -> str:
    """The line that says the server is up (what scripts and tests wait for), the same with one process or several."""
    return f"shoal: listening on http://{host}:{port}/ (protocol v1 at ws://{host}:{port}/v1/realtime)"


def _redact(url: str) -> str:
    """Hide a password in a redis URL before printing it."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
