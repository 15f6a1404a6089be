"""Soak: a long run at steady load (say 80 % of the capacity a sweep found), watching the server for leaks.

Every ``sample_s`` the server's resident memory and open file descriptors (psutil; summed over its gateway
processes, those of its process tree listening on the port: one unless ``shoal serve --processes N``) and its
asyncio task count and open connections (``/metrics``) are sampled into ``soak.csv``, beside the run's usual raw
events and report. ``soak.json`` says whether each stayed flat under load, judged on the second half of the load:
bounded caches fill in the first (each session's in-memory window of recent turns, ``Limits.context_turns``; the
allocator's arenas), a leak keeps growing in the second too. The median of the last tenth of the samples taken
while turns were starting is set against the median of the first tenth of the second half, within ``max(share x
start, floor)``; the first half's growth and the second half's slope per minute are reported beside it. And whether
the server settled once the clients left: no connection open, no client socket left, other file descriptors and
tasks back to within a few of where they were before the run. Sockets to the store and the engine workers are
reported, not judged: the store's connection pool keeps, idle, the connections it opened at the peak of concurrent
commands.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx
import psutil

from loadtest.config import SwarmConfig
from loadtest.cpu import gateway_pids
from loadtest.runner import run_once

# series -> (allowed share of growth, allowed growth floor in the series' unit)
FLAT = {"rss_mb": (0.10, 20.0), "fds": (0.10, 10.0), "tasks": (0.10, 20.0)}


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the soak started
    rss_mb: float
    fds: int
    tasks: float  # NaN if /metrics did not answer
    connections: float
    gateways: int = 1  # the gateway processes whose memory and descriptors are summed


def _gateways(pid: int, port: int) -> list[psutil.Process]:
    """The server's gateway processes: those of the tree under ``pid`` listening on ``port`` (``shoal serve
    --processes N``: N of them), or ``pid`` itself if none can be seen."""
    procs = []
    for gateway in gateway_pids(pid, port) or [pid]:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(gateway))
    return procs


class _Sampler(threading.Thread):
    def __init__(self, pid: int, port: int, metrics_url: str, period_s: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.pid, self.port = pid, port
        self.metrics_url = metrics_url
        self.period_s = period_s
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        with httpx.Client(timeout=5.0) as http:
            while not self.stop.is_set():
                self.samples.append(self._sample(http))
                self.stop.wait(self.period_s)

    def _sample(self, http: httpx.Client) -> Sample:
        try:
            text = http.get(self.metrics_url).text
        except httpx.HTTPError:
            text = ""
        rss = fds = 0
        gateways = _gateways(self.pid, self.port)
        for proc in gateways:
            with contextlib.suppress(psutil.Error):
                rss, fds = rss + proc.memory_info().rss, fds + proc.num_fds()
        return Sample(t=round(time.monotonic() - self.t0, 2), rss_mb=round(rss / 2**20, 1), fds=fds,
                      tasks=_metric(text, "shoal_event_loop_tasks"), connections=_metric(text, "shoal_connections_open"),
                      gateways=len(gateways))


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+|NaN)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


SETTLED = {"files": 5, "tasks": 5}  # after the run, at most this many more than before it


def flatness(samples: list[Sample], warmup_s: float, until_s: float) -> dict[str, Any]:
    """Per series over the second half of the load: start and end (medians of its first and last tenth), growth,
    allowed, flat, slope per minute; and ``fill``, the growth over the first half, for information."""
    steady = [s for s in samples if warmup_s <= s.t <= until_s]
    out: dict[str, Any] = {"samples": len(steady)}
    if len(steady) < 20:
        return {**out, "flat": None, "why": "too few samples after warm-up for a verdict"}
    first, second = steady[:len(steady) // 2], steady[len(steady) // 2:]
    out["judged_from_s"] = second[0].t
    tenth = max(1, len(second) // 10)
    flat = True
    for name, (share, floor) in FLAT.items():
        values = [getattr(s, name) for s in second]
        if any(v != v for v in values):  # NaN: not measured
            out[name] = None
            continue
        head = [getattr(s, name) for s in first[:tenth]]
        start, end = statistics.median(values[:tenth]), statistics.median(values[-tenth:])
        allowed = max(share * start, floor)
        ok = end - start <= allowed
        flat = flat and ok
        slope = statistics.linear_regression([s.t for s in second], values).slope * 60.0
        out[name] = {"start": start, "end": end, "min": min(values), "max": max(values),
                     "growth": round(end - start, 2), "allowed": round(allowed, 2), "flat": ok,
                     "per_min": round(slope, 3), "fill": round(start - statistics.median(head), 2)}
    return {**out, "flat": flat}


def soak(config: SwarmConfig, out_dir: Path, server_pid: int, server_info: dict[str, Any] | None,
         sample_s: float = 10.0, settle_s: float = 5.0, progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Run the swarm as ``run_once`` does, sampling the server throughout; write soak.csv and soak.json."""
    parts = urlsplit(config.url)
    scheme = "https" if parts.scheme == "wss" else "http"
    port = parts.port or (443 if scheme == "https" else 80)
    sampler = _Sampler(server_pid, port, f"{scheme}://{parts.netloc}/metrics", sample_s)
    fds_before = _fd_kinds(server_pid, port)
    sampler.start()
    try:
        summary = run_once(config, out_dir, server_pid, server_info, progress=progress)
        time.sleep(settle_s)  # the last connections close, their tasks end
    finally:
        sampler.stop.set()
        sampler.join()
    samples = sampler.samples
    with open(out_dir / "soak.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Sample.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)
    verdict = {
        "sessions": config.sessions,
        "duration_s": config.duration_s,
        "sample_s": sample_s,
        **flatness(samples, config.measure_from_s, config.duration_s),
        "settled": _settled(samples[0], samples[-1], fds_before, _fd_kinds(server_pid, port)),
        "run": {k: summary[k] for k in ("sessions_ready", "turns", "errors", "underruns", "ttfa_ms")},
        "sane": summary["sanity"]["ok"],
    }
    (out_dir / "soak.json").write_text(json.dumps(verdict, indent=2))
    return verdict


def _fd_kinds(pid: int, port: int) -> dict[str, int]:
    """The gateway processes' file descriptors, summed (see :func:`_fd_kinds_of`)."""
    total = {"client_sockets": 0, "sockets": 0, "files": 0}
    for proc in _gateways(pid, port):
        with contextlib.suppress(psutil.Error, OSError):
            for k, v in _fd_kinds_of(proc, port).items():
                total[k] += v
    return total


def _fd_kinds_of(proc: psutil.Process, port: int) -> dict[str, int]:
    """A process's file descriptors: ``client_sockets`` (TCP on the served port, not listening), ``sockets``
    (all other sockets: the listener, the store's pool, engine workers) and ``files`` (everything else)."""
    pid = proc.pid
    try:
        clients = sum(1 for c in proc.net_connections(kind="tcp")
                      if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN)
    except (psutil.AccessDenied, OSError):
        clients = -1  # not visible: judged by the connections gauge alone
    sockets = files = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue  # closed while listed
        if target.startswith("socket:"):
            sockets += 1
        else:
            files += 1
    return {"client_sockets": max(clients, 0), "sockets": sockets - max(clients, 0), "files": files}


def _settled(before: Sample, after: Sample, fds_before: dict[str, int], fds_after: dict[str, int]) -> dict[str, Any]:
    """The server once the clients have gone, against before they came."""
    out: dict[str, Any] = {"connections_after": after.connections,
                           "client_sockets_after": fds_after["client_sockets"],
                           "fds": {"before": before.fds, "after": after.fds},
                           "sockets": {"before": fds_before["sockets"], "after": fds_after["sockets"]},
                           "files": {"before": fds_before["files"], "after": fds_after["files"]},
                           "tasks": {"before": before.tasks, "after": after.tasks}}
    ok = after.connections == 0 and fds_after["client_sockets"] == 0
    ok = ok and fds_after["files"] <= fds_before["files"] + SETTLED["files"]
    ok = ok and after.tasks <= before.tasks + SETTLED["tasks"]
    return {**out, "ok": ok}
