"""Run the swarm: sessions ramped up over time, floor probes, CPU sampling and a progress display.

Writes ``RAW/meta.json`` (settings, machine, server) and ``RAW/events.msgpack`` (every event, as it happens).
With ``telephony`` each session is a phone call (:mod:`loadtest.call`); before the load, the caller's voice is made
and the server's input path timed in-process (:func:`loadtest.caller.vad_cost`, in meta.json as ``vad_bench``).
Nothing is summarised here: that is :mod:`loadtest.stats`. The run is bounded: no turn starts after
``duration_s``, and at ``duration_s + drain_s`` whatever still runs is stopped.
"""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import psutil

from loadtest.call import SimCall
from loadtest.caller import UTTERANCE, CallerVoice, utterance_8k, vad_cost
from loadtest.client import Live, SimSession
from loadtest.config import SwarmConfig
from loadtest.cpu import CpuSampler
from loadtest.floor import EchoServer, probe
from loadtest.record import EVENTS_FILE, META_FILE, Recorder


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model or platform.processor(),
        "cores": psutil.cpu_count(logical=True),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


async def _lag_monitor(rec: Recorder, until: float, period_s: float = 0.05) -> None:
    """The client's own event-loop lag: how late a timer fires. High lag means the client, not the server, is slow."""
    for _ in range(int(until / period_s) + 2):
        if rec.now() >= until:
            return
        start = time.monotonic()
        await asyncio.sleep(period_s)
        rec.event("lag", rec.now(), round((time.monotonic() - start - period_s) * 1000.0, 3))


async def _sampler(rec: Recorder, cpu: CpuSampler, live: Live, config: SwarmConfig, until: float, out: TextIO | None) -> None:
    tty = out is not None and out.isatty()
    last_print = -1e9
    for _ in range(int(until / config.cpu_interval_s) + 2):
        if rec.now() >= until:
            return
        await asyncio.sleep(config.cpu_interval_s)
        cpu.sample(rec)
        rec.flush()
        now = rec.now()
        if out is not None and (tty or now - last_print >= 5.0):
            last_print = now
            recent = live.ttfa_ms[-2000:]
            p50, p99 = (np.percentile(recent, [50, 99]) if recent else (float("nan"), float("nan")))
            line = (
                f"[{now:6.1f}s] sessions {live.open:4d}/{config.sessions} turns {live.turns:5d} "
                f"audio {live.audio_ms / 1000:8.1f}s ttfa(server) p50 {p50:5.1f} p99 {p99:5.1f} ms "
                f"underruns {live.underruns} errors {live.errors}"
            )
            out.write(("\r" + line) if tty else line + "\n")
            out.flush()
        if len(live.ttfa_ms) > 10_000:
            del live.ttfa_ms[:5_000]


async def _swarm(config: SwarmConfig, rec: Recorder, server_pid: int | None, floor_url: str | None, out: TextIO | None,
                 voice: CallerVoice | None = None) -> None:
    live = Live()
    hard_stop = config.duration_s + config.drain_s
    sessions = [
        SimSession(i, config, rec, live, hard_stop) if voice is None else SimCall(i, config, rec, live, hard_stop, voice)
        for i in range(config.sessions)
    ]
    step = config.ramp_s / config.sessions if config.sessions > 1 else 0.0
    tasks = [asyncio.create_task(s.run(i * step), name=f"session-{i}") for i, s in enumerate(sessions)]
    background = [
        asyncio.create_task(_sampler(rec, CpuSampler(server_pid), live, config, hard_stop, out)),
        asyncio.create_task(_lag_monitor(rec, hard_stop)),
    ]
    if floor_url is not None:
        background += [
            asyncio.create_task(
                probe(floor_url, i, rec, config.duration_s, config.floor_interval_s, config.seed, config.compression)
            )
            for i in range(config.floor_probes)
        ]
    try:
        await asyncio.wait(tasks, timeout=hard_stop + 10.0)
    finally:
        for t in tasks + background:
            t.cancel()
        await asyncio.gather(*tasks, *background, return_exceptions=True)
        if out is not None:
            out.write(f"{chr(10) if out.isatty() else ''}swarm: {live.connected} sessions connected, "
                      f"{live.turns} turns, {live.errors} errors\n")
            out.flush()


def run_swarm(
    config: SwarmConfig,
    raw_dir: Path,
    server_pid: int | None = None,
    server_info: dict[str, Any] | None = None,
    progress: TextIO | None = sys.stderr,
) -> Path:
    """Run the load and record it under ``raw_dir``. Returns ``raw_dir``."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "config": config.to_json(),
        "machine": machine(),
        "server": {**(server_info or {}), "pid": server_pid},
    }
    voice = None
    if config.telephony:
        voice = CallerVoice.make(config.seed)
        meta["caller"] = {"utterance": UTTERANCE, "utterance_ms": voice.utterance_ms, "onset_ms": voice.onset_ms}
        if config.vad_bench_s > 0:
            meta["vad_bench"] = vad_cost(config.vad_bench_s, utterance_8k(), config.seed)
    echo = EchoServer(config.compression) if config.floor_probes else None
    rec = Recorder(raw_dir / EVENTS_FILE)
    meta["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        asyncio.run(_swarm(config, rec, server_pid, echo.url if echo else None, progress, voice))
    finally:
        rec.close()
        if echo is not None:
            echo.stop()
    meta["events"] = rec.count
    meta["wall_s"] = round(rec.now(), 3)
    (raw_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return raw_dir
