"""CPU of the server (by pid) and of the load test itself, sampled during the run (psutil).

Percentages are of one core (200 = two cores busy). ``server`` is the process that serves the WebSocket (the
gateway's event loop), ``children`` all its descendants (engine workers, an embedded Redis), ``client`` this
process, ``system`` the whole machine. ``server_wait`` and ``client_wait`` are the shares of wall time the two
event loops (main threads) were ready to run but waited for a CPU (Linux schedstat): the direct measure of
contention, whether from each other or from a neighbour.
"""

from __future__ import annotations

import contextlib
import time
from urllib.parse import urlsplit

import psutil

from loadtest.record import Recorder


def listening_pid(url: str) -> int | None:
    """The pid of the process listening on the URL's port on loopback, if it can be seen."""
    port = urlsplit(url).port
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return int(c.pid)
    return None


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


class CpuSampler:
    def __init__(self, server_pid: int | None) -> None:
        self.ncpu = psutil.cpu_count() or 1
        self.me = psutil.Process()
        self._my_wait = _WaitShare(self.me.pid)
        self._server_wait = _WaitShare(server_pid) if server_pid is not None else None
        self.me.cpu_percent(None)
        psutil.cpu_percent(None)
        self.server: psutil.Process | None = None
        self._children: dict[int, psutil.Process] = {}
        if server_pid is not None:
            with contextlib.suppress(psutil.Error):
                self.server = psutil.Process(server_pid)
                self.server.cpu_percent(None)
                self._refresh_children()

    def _refresh_children(self) -> None:
        assert self.server is not None
        try:
            current = {p.pid: p for p in self.server.children(recursive=True)}
        except psutil.Error:
            current = {}
        for pid, proc in current.items():
            if pid not in self._children:
                with contextlib.suppress(psutil.Error):
                    proc.cpu_percent(None)  # the first call only sets the baseline
                self._children[pid] = proc
        for pid in list(self._children):
            if pid not in current:
                del self._children[pid]

    def sample(self, rec: Recorder) -> None:
        server: float | None = None
        children: float | None = None
        if self.server is not None:
            try:
                server = self.server.cpu_percent(None)
                children = 0.0
                for proc in list(self._children.values()):
                    with contextlib.suppress(psutil.Error):
                        children += proc.cpu_percent(None)
                self._refresh_children()
            except psutil.Error:
                self.server = None
        system = psutil.cpu_percent(None) * self.ncpu
        server_wait = self._server_wait() if self._server_wait is not None and self.server is not None else None
        rec.event("cpu", rec.now(), _r(server), _r(children), _r(self.me.cpu_percent(None)), _r(system),
                  _r(server_wait), _r(self._my_wait()))


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
