"""The gateway in several processes on one port: ``shoal serve --processes N``.

One event loop runs one core; the per-packet work (Opus, framing, pacing) of a few dozen streams fills it. So the
parent process keeps what is shared (the embedded Redis, the engine workers, the port) and starts N gateway
processes, each a whole gateway (its own uvicorn, app and event loop) on the same port:

- The port: the parent binds it with ``SO_REUSEPORT`` and never listens on it (so ``--port 0`` has one number for
  all); each gateway binds its own listening socket to it with ``SO_REUSEPORT`` and the kernel spreads incoming
  connections over them (by a hash of the client's address and port).
- The store: one Redis for all. Sessions stay correct across processes: the ownership lease lets one connection
  own a session at a time, wherever it is, and a session resumed through another process reads its turns there.
- The engine: ``--workers N`` (or ``--worker-pool``) workers registered in that Redis, routed to by every process
  alike (rendezvous hashing on the session id: a session's turns go to the same worker whichever process serves
  it). Light engines (the stub, the built-in voice) run in each process instead.
- Metrics: prometheus-client's multiprocess mode in a directory the parent makes and removes (realtime.metrics).
- Shutdown: SIGTERM or Ctrl-C reaches the parent, which sends SIGTERM to every gateway; each drains its sessions
  as one gateway does (``error`` + close 1001), then the parent stops the workers and Redis. The gateways ignore
  SIGINT (a terminal's Ctrl-C reaches the whole group; a second signal would make uvicorn skip its drain).
- Failure: a gateway that dies is started again (engine.supervisor's policy, said once with its pid); a gateway
  whose parent is gone stops.

The gateways are started with multiprocessing's ``spawn`` (a fresh interpreter: prometheus-client must be
imported after ``PROMETHEUS_MULTIPROC_DIR`` is set, and nothing of the parent's state is inherited).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from engine.base import Synthesizer
from engine.supervisor import Backoff, Supervisor
from realtime.config import ServerConfig
from realtime.metrics import multiprocess_env

__all__ = ["GatewayProcesses", "GatewaySpec", "GatewayStartError", "listening_socket", "reserve_port"]

log = logging.getLogger("shoal.processes")

LISTEN_BACKLOG = 2048
START_TIMEOUT_S = 60.0


class GatewayStartError(RuntimeError):
    """A gateway process did not come up."""


def _tcp_socket(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP (accepted ones inherit it);
    # with proto 0, Nagle held each audio packet until the previous one was acknowledged (+12 ms to first audio)
    return socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("this platform has no SO_REUSEPORT: run one gateway process (--processes 1)")
    sock = _tcp_socket(host)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def reserve_port(host: str, port: int) -> socket.socket:
    """The parent's hold on the port: bound with SO_REUSEPORT, never listening (connections go only to listening
    sockets). With port 0 it picks the number every gateway then binds. A port some other server holds is refused
    first: SO_REUSEPORT alone would let two servers of the same user share it silently."""
    with _tcp_socket(host) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: connections in TIME_WAIT are fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
        port = probe.getsockname()[1]
    return _reuse_port_socket(host, port)


def listening_socket(host: str, port: int) -> socket.socket:
    """A gateway's own listening socket on the shared port."""
    sock = _reuse_port_socket(host, port)
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(False)
    return sock


@dataclass(frozen=True)
class GatewaySpec:
    """What a gateway process needs; picklable (it crosses to a fresh interpreter)."""

    config: ServerConfig  # redis_url, port and metrics_dir set: the shared store, port and metrics
    engine: Callable[[], Synthesizer] | None  # the engine to build in the process; None: worker_pool
    worker_pool: str | None
    verbose: bool = False


def _gateway_main(spec: GatewaySpec, slot: int, parent_pid: int, ready: Any) -> None:
    """A gateway process: one whole gateway on the shared port, until SIGTERM or its parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; see the module docstring
    logging.basicConfig(level=logging.INFO if spec.verbose else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s %(name)s [gateway {slot}]: %(message)s")
    from realtime.server import serve  # here: realtime.server imports this module

    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    engine = spec.engine() if spec.engine is not None else None
    with open(os.devnull, "w") as quiet:  # the parent announces the server once
        code = serve(spec.config, engine, quiet, worker_pool=spec.worker_pool, on_ready=ready.set, reuse_port=True)
    raise SystemExit(code)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    log.warning("the parent process %d is gone: stopping", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)


class GatewayProcesses:
    """N gateway processes on ``spec.config.port``, kept running until ``stop``."""

    def __init__(self, spec: GatewaySpec, count: int, backoff: Backoff | None = None) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.spec = spec
        self.count = count
        self._mp = multiprocessing.get_context("spawn")
        self._children: list[BaseProcess | None] = [None] * count
        self._ready: list[Any] = [None] * count
        self._policy = Supervisor("gateway process {slot}", slots=count, backoff=backoff or Backoff())

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self._children if c is not None and c.pid is not None and c.is_alive()]

    @property
    def restarts(self) -> int:
        return self._policy.restarts

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start every gateway and wait until each listens; on a failure stop those started and raise."""
        for slot in range(self.count):
            self._spawn(slot)
        deadline = time.monotonic() + timeout_s
        for slot in range(self.count):
            child, ready = self._children[slot], self._ready[slot]
            assert child is not None
            while not ready.wait(0.1):
                if not child.is_alive() or time.monotonic() > deadline:
                    why = (f"exited with code {child.exitcode}" if not child.is_alive()
                           else f"did not listen within {timeout_s:g} s")
                    self.stop(5.0)
                    raise GatewayStartError(f"gateway process {slot} (pid {child.pid}) {why}; see its log above")

    def _spawn(self, slot: int) -> None:
        ready = self._mp.Event()
        child = self._mp.Process(target=_gateway_main, args=(self.spec, slot, os.getpid(), ready),
                                 name=f"shoal-gateway-{slot}", daemon=False)
        directory = self.spec.config.metrics_dir
        # for the child only: a spawned interpreter starts with the parent's environment, and its prometheus-client
        # reads PROMETHEUS_MULTIPROC_DIR when it is first imported
        with multiprocess_env(directory) if directory is not None else contextlib.nullcontext():
            child.start()
        self._children[slot], self._ready[slot] = child, ready
        self._policy.started(slot)

    def supervise(self, stop: threading.Event, period_s: float = 0.25) -> None:
        """Until ``stop`` is set: start again any gateway that died (after the policy's delay)."""
        while not stop.wait(period_s):
            for slot, child in enumerate(self._children):
                if child is not None and not child.is_alive():
                    self._forget(child)
                    self._children[slot] = None
                    self._policy.failed(slot, f"exited with code {child.exitcode}", pid=child.pid)
                if self._children[slot] is None and self._policy.wait_s(slot) <= 0 and not stop.is_set():
                    self._spawn(slot)

    def stop(self, timeout_s: float) -> None:
        """SIGTERM to every gateway (each drains its sessions), wait ``timeout_s``, then kill what is left."""
        self._policy.stop()
        live = [c for c in self._children if c is not None and c.is_alive()]
        for child in live:
            with contextlib.suppress(OSError):  # gone already
                os.kill(child.pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + timeout_s
        for child in live:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                log.warning("gateway process %s did not stop in %g s: killing it", child.pid, timeout_s)
                child.kill()
                child.join(5.0)
        for child in self._children:
            if child is not None:
                self._forget(child)

    def _forget(self, child: BaseProcess) -> None:
        """A gateway is gone: its live gauges leave the shared metrics (its counters stay in the totals)."""
        directory = self.spec.config.metrics_dir
        if directory is not None and child.pid is not None:
            from prometheus_client.multiprocess import mark_process_dead

            with contextlib.suppress(OSError):  # gone already
                mark_process_dead(child.pid, str(directory))


def gateway_spec(config: ServerConfig, redis_url: str, port: int, metrics_dir: Path,
                 engine: Callable[[], Synthesizer] | None, worker_pool: str | None, verbose: bool) -> GatewaySpec:
    """The spec of every gateway of a parent: its config with the shared store, port and metrics."""
    # each process encodes on its own loop: the other cores are the other processes' (ServerConfig.encode_on_loop)
    one = replace(config, redis_url=redis_url, port=port, processes=1, metrics_dir=metrics_dir, encode_on_loop=True)
    return GatewaySpec(config=one, engine=engine, worker_pool=worker_pool, verbose=verbose)
