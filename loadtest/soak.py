"""Soak: a long run at steady load (say 80 % of the capacity a sweep found), watching the server for leaks.

Every ``sample_s`` the server's resident memory and open file descriptors (psutil, by pid) and its asyncio task
count and open connections (``/metrics``) are sampled into ``soak.csv``, beside the run's usual raw events and
report. ``soak.json`` says whether each stayed flat under load: the median of the last tenth of the samples taken
while turns were starting against the median of the first tenth after warm-up, within ``max(share x start,
floor)``; and whether the server settled once the clients left (no connection open, file descriptors and tasks
back to within a few of where they were before the run). Resident memory may grow a little as allocators settle;
a leak grows without bound, so a 30-minute run tells them apart.
"""

from __future__ import annotations

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


class _Sampler(threading.Thread):
    def __init__(self, pid: int, metrics_url: str, period_s: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.proc = psutil.Process(pid)
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
        return Sample(t=round(time.monotonic() - self.t0, 2), rss_mb=round(self.proc.memory_info().rss / 2**20, 1),
                      fds=self.proc.num_fds(), tasks=_metric(text, "shoal_event_loop_tasks"),
                      connections=_metric(text, "shoal_connections_open"))


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+|NaN)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


SETTLED = {"fds": 5, "tasks": 5}  # after the run, at most this many more than before it


def flatness(samples: list[Sample], warmup_s: float, until_s: float) -> dict[str, Any]:
    """Per series: start and end (medians of the first and last tenth of the samples under load), growth,
    allowed, flat."""
    steady = [s for s in samples if warmup_s <= s.t <= until_s]
    out: dict[str, Any] = {"samples": len(steady)}
    if len(steady) < 10:
        return {**out, "flat": None, "why": "too few samples after warm-up for a verdict"}
    tenth = max(1, len(steady) // 10)
    flat = True
    for name, (share, floor) in FLAT.items():
        values = [getattr(s, name) for s in steady]
        if any(v != v for v in values):  # NaN: not measured
            out[name] = None
            continue
        start, end = statistics.median(values[:tenth]), statistics.median(values[-tenth:])
        allowed = max(share * start, floor)
        ok = end - start <= allowed
        flat = flat and ok
        out[name] = {"start": start, "end": end, "min": min(values), "max": max(values),
                     "growth": round(end - start, 2), "allowed": round(allowed, 2), "flat": ok}
    return {**out, "flat": flat}


def soak(config: SwarmConfig, out_dir: Path, server_pid: int, server_info: dict[str, Any] | None,
         sample_s: float = 10.0, settle_s: float = 5.0, progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Run the swarm as ``run_once`` does, sampling the server throughout; write soak.csv and soak.json."""
    parts = urlsplit(config.url)
    scheme = "https" if parts.scheme == "wss" else "http"
    sampler = _Sampler(server_pid, f"{scheme}://{parts.netloc}/metrics", sample_s)
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
        "settled": _settled(samples[0], samples[-1]),
        "run": {k: summary[k] for k in ("sessions_ready", "turns", "errors", "underruns", "ttfa_ms")},
        "sane": summary["sanity"]["ok"],
    }
    (out_dir / "soak.json").write_text(json.dumps(verdict, indent=2))
    return verdict


def _settled(before: Sample, after: Sample) -> dict[str, Any]:
    """The server once the clients have gone, against before they came."""
    out: dict[str, Any] = {"connections_after": after.connections}
    ok = after.connections == 0
    for name, slack in SETTLED.items():
        b, a = getattr(before, name), getattr(after, name)
        out[name] = {"before": b, "after": a}
        ok = ok and a <= b + slack
    return {**out, "ok": ok}
