"""CPU of the server (a process tree) and of the load test itself (one or more processes), sampled during the run
(psutil).

Percentages are of one core (200 = two cores busy). The server is a process tree: the pid given (or found
listening on the URL's port) and all its descendants. ``server`` is the sum over the *gateway processes*, those of
the tree listening on the served port (one for ``shoal serve``; N for ``shoal serve --processes N``, which share the
port with SO_REUSEPORT), ``children`` the sum over the rest of the tree (a supervisor that does not itself listen,
engine workers, an embedded Redis). ``client`` is the sum over the load-generator processes (this one and, with
``--client-processes N``, its N children), ``client_max`` the busiest of them (a generator saturates one core, not
the sum), ``system`` the whole machine, ``gateways`` how many gateway processes were sampled.

``server_wait`` and ``client_wait`` are the shares of wall time an event loop (a process's main thread) was ready
to run but waited for a CPU (Linux schedstat): the direct measure of contention, whether from each other or from a
neighbour. With several processes each is the **max** over them (the most starved gateway, the most starved
generator): one starved event loop is enough to delay its sessions.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

import psutil

from loadtest.record import Recorder


def listening_pids(port: int) -> list[int]:
    """The pids with a TCP socket listening on ``port`` (several share it with SO_REUSEPORT), as far as visible."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return []
    return sorted({int(c.pid) for c in conns
                   if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid})


def listening_pid(url: str) -> int | None:
    """The root of the server's process tree listening on the URL's port, if it can be seen: the one process
    listening, or, when several do (``shoal serve --processes N``), their common parent (the supervisor), unless
    that parent is one of this process's ancestors or init (then the first of them)."""
    port = urlsplit(url).port
    pids = listening_pids(port) if port is not None else []
    if len(pids) <= 1:
        return pids[0] if pids else None
    try:
        parents = {psutil.Process(pid).ppid() for pid in pids}
        mine = {p.pid for p in psutil.Process().parents()} | {os.getpid()}
    except psutil.Error:
        return pids[0]
    if len(parents) == 1:
        (parent,) = parents
        if parent > 1 and parent not in mine:
            return parent
    return pids[0]


def _listens(proc: psutil.Process, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in proc.net_connections(kind="tcp"))
    except (psutil.Error, OSError):
        return False


def gateway_pids(root_pid: int, port: int) -> list[int]:
    """The processes of the tree under ``root_pid`` (itself included) listening on ``port``."""
    try:
        root = psutil.Process(root_pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    return sorted(p.pid for p in tree if _listens(p, port))


def _runqueue_wait_ns(pid: int) -> int | None:
    """Nanoseconds the process's main thread has spent runnable but waiting for a CPU (Linux schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


class _WaitShare:
    """Share of wall time a process's main thread spent waiting for a CPU since the last call (100 = always)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._last = (time.monotonic(), _runqueue_wait_ns(pid))

    def __call__(self) -> float | None:
        now, wait = time.monotonic(), _runqueue_wait_ns(self.pid)
        (then, before), self._last = self._last, (now, wait)
        if wait is None or before is None or now <= then:
            return None
        return 100.0 * (wait - before) / 1e9 / (now - then)


class _Tracked:
    """One sampled process: its CPU since the last sample, and its main thread's wait for a CPU."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.wait = _WaitShare(proc.pid)
        self.gateway = False
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent(None)  # the first call only sets the baseline

    def cpu(self) -> float | None:
        try:
            return self.proc.cpu_percent(None)
        except psutil.Error:
            return None


def _max(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


class CpuSampler:
    """Samples the server's process tree and the load generator's processes; one ``cpu`` event per ``sample``.

    ``port``: the served port, to tell the gateway processes (listening on it) from the rest of the tree; without
    it the root alone is the gateway (as before servers had several processes). ``client_pids``: the load
    generator's processes (default: this one)."""

    def __init__(self, server_pid: int | None, port: int | None = None, client_pids: Iterable[int] | None = None) -> None:
        self.ncpu = psutil.cpu_count() or 1
        self.port = port
        self._clients: list[_Tracked] = []
        for pid in client_pids if client_pids is not None else [os.getpid()]:
            with contextlib.suppress(psutil.Error):
                self._clients.append(_Tracked(psutil.Process(pid)))
        psutil.cpu_percent(None)
        self.root: psutil.Process | None = None
        self._tree: dict[int, _Tracked] = {}
        self.gateways_seen: set[int] = set()  # every pid that served as a gateway during the run
        if server_pid is not None:
            with contextlib.suppress(psutil.Error):
                self.root = psutil.Process(server_pid)
                self._refresh()

    def _refresh(self) -> None:
        """Follow the tree: new descendants start their baseline, gone ones are dropped; classify the gateways."""
        assert self.root is not None
        try:
            current = {p.pid: p for p in [self.root, *self.root.children(recursive=True)]}
        except psutil.Error:
            current = {p.pid: p.proc for p in self._tree.values() if p.proc.is_running()}
        for pid, proc in current.items():
            if pid not in self._tree:
                self._tree[pid] = _Tracked(proc)
        for pid in list(self._tree):
            if pid not in current:
                del self._tree[pid]
        if self.port is None:
            for pid, t in self._tree.items():
                t.gateway = pid == self.root.pid
        else:
            for t in self._tree.values():
                if not t.gateway:  # a gateway keeps listening; the others are asked again (one may start late)
                    t.gateway = _listens(t.proc, self.port)
            if not any(t.gateway for t in self._tree.values()) and self.root.pid in self._tree:
                self._tree[self.root.pid].gateway = True  # the sockets cannot be seen: the root serves
        self.gateways_seen |= {pid for pid, t in self._tree.items() if t.gateway}

    def sample(self, rec: Recorder) -> None:
        server: float | None = None
        children: float | None = None
        server_wait: float | None = None
        gateways: int | None = None
        if self.root is not None:
            if not self.root.is_running():
                self.root = None
                self._tree.clear()
            else:
                server, children, waits, gateways = 0.0, 0.0, [], 0
                for t in list(self._tree.values()):
                    cpu = t.cpu()
                    if t.gateway:
                        gateways += 1
                        server += cpu or 0.0
                        waits.append(t.wait())
                    else:
                        children += cpu or 0.0
                server_wait = _max(waits)
                self._refresh()
        client_cpu = [t.cpu() for t in self._clients]
        client = sum(c for c in client_cpu if c is not None)
        system = psutil.cpu_percent(None) * self.ncpu
        rec.event("cpu", rec.now(), _r(server), _r(children), _r(client), _r(system),
                  _r(server_wait), _r(_max(t.wait() for t in self._clients)), gateways, _r(_max(client_cpu)))


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def wait_quiet(max_wait_s: float, limit_pct: float = 15.0, hold_s: int = 3) -> bool:
    """Wait (at most ``max_wait_s``) until the whole machine's CPU stays under ``limit_pct`` (100 = one core) for
    ``hold_s`` consecutive seconds: on a shared machine, a busy neighbour would make the numbers meaningless.
    Returns whether it got quiet."""
    deadline = time.monotonic() + max_wait_s
    ncpu = psutil.cpu_count() or 1
    psutil.cpu_percent(None)
    quiet = 0
    while time.monotonic() < deadline:
        time.sleep(1.0)
        quiet = quiet + 1 if psutil.cpu_percent(None) * ncpu < limit_pct else 0
        if quiet >= hold_s:
            return True
    return False
