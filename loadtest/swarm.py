"""Run the swarm: sessions ramped up over time, floor probes, CPU sampling and a progress display.

Writes ``RAW/meta.json`` (settings, machine, server, the load-generator processes) and ``RAW/events.msgpack``
(every event, as it happens). With ``client_processes`` > 1 the sessions run in that many load-generator processes
(:mod:`loadtest.generator`), each recording a part that is merged into ``events.msgpack`` at the end; the floor
probes and the CPU sampler (server tree, and every generator process) run once, here.
With ``telephony`` each session is a phone call (:mod:`loadtest.call`); before the load, the caller's voice is made
and the server's input path timed in-process (:func:`loadtest.caller.vad_cost`, in meta.json as ``vad_bench``).
Nothing is summarised here: that is :mod:`loadtest.stats`. The run is bounded: no turn starts after
``duration_s``, and at ``duration_s + drain_s`` whatever still runs is stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import numpy as np
import psutil

from loadtest.call import SimCall
from loadtest.caller import UTTERANCE, CallerVoice, utterance_8k, vad_cost
from loadtest.client import Live, SimSession
from loadtest.codec_bench import floor_pct
from loadtest.config import SwarmConfig
from loadtest.cpu import CpuSampler
from loadtest.floor import EchoServer, probe
from loadtest.generator import Generators
from loadtest.record import EVENTS_FILE, META_FILE, Recorder, merge

PARENT_EVENTS_FILE = "events-parent.msgpack"  # with several load-generator processes: this one's part


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


async def run_sessions(config: SwarmConfig, rec: Recorder, live: Live, sids: Iterable[int],
                       voice: CallerVoice | None = None) -> None:
    """Run the sessions ``sids`` of the swarm (all of them, or a load-generator process's share) and this process's
    event-loop lag monitor, until the sessions end or the run's hard stop. Session ``sid`` connects at
    ``sid * ramp_s / sessions`` whichever process runs it."""
    hard_stop = config.duration_s + config.drain_s
    step = config.ramp_s / config.sessions if config.sessions > 1 else 0.0
    sessions = [
        SimSession(i, config, rec, live, hard_stop) if voice is None else SimCall(i, config, rec, live, hard_stop, voice)
        for i in sids
    ]
    tasks = [asyncio.create_task(s.run(s.sid * step), name=f"session-{s.sid}") for s in sessions]
    lag = asyncio.create_task(_lag_monitor(rec, hard_stop))
    try:
        if tasks:
            await asyncio.wait(tasks, timeout=hard_stop + 10.0)
    finally:
        for t in [*tasks, lag]:
            t.cancel()
        await asyncio.gather(*tasks, lag, return_exceptions=True)


@dataclass
class _Outcome:
    rec: Recorder
    sampler: CpuSampler
    generators: Generators | None


async def _swarm(config: SwarmConfig, raw_dir: Path, server_pid: int | None, floor_url: str | None,
                 out: TextIO | None, voice: CallerVoice | None = None) -> _Outcome:
    """The load: in this process, or (``client_processes`` > 1) in load-generator processes started together on
    this one's clock; the CPU sampler and the floor probes run here, once."""
    hard_stop = config.duration_s + config.drain_s
    generators = Generators() if min(config.client_processes, config.sessions) > 1 else None
    if generators is not None:
        try:
            await generators.start(config, raw_dir)
        except BaseException:
            generators.kill()
            raise
    rec = Recorder(raw_dir / (EVENTS_FILE if generators is None else PARENT_EVENTS_FILE))
    if generators is not None:
        await generators.go(rec.t0)
    live = generators.live if generators is not None else Live()
    sampler = CpuSampler(server_pid, urlsplit(config.url).port,
                         [os.getpid(), *(generators.pids if generators is not None else [])])
    background = [asyncio.create_task(_sampler(rec, sampler, live, config, hard_stop, out))]
    if floor_url is not None:
        background += [
            asyncio.create_task(
                probe(floor_url, i, rec, config.duration_s, config.floor_interval_s, config.seed, config.compression)
            )
            for i in range(config.floor_probes)
        ]
    try:
        if generators is None:
            await run_sessions(config, rec, live, range(config.sessions), voice)
        else:
            await generators.wait(hard_stop + 30.0)
    finally:
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if generators is not None:
            generators.kill()
            for child in generators.failed():
                rec.event("err", rec.now(), -1000 - child.index, "client_process",
                          f"load-generator process {child.proc.pid} exited with {child.proc.returncode}; see "
                          f"{child.log.name}", True)
        if out is not None:
            out.write(f"{chr(10) if out.isatty() else ''}swarm: {live.connected} sessions connected, "
                      f"{live.turns} turns, {live.errors} errors"
                      + (f", {len(generators.children)} load-generator processes" if generators is not None else "")
                      + "\n")
            out.flush()
    return _Outcome(rec, sampler, generators)


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
    if config.codec == "opus":  # the floor beside the headline: what libopus alone costs a stream here
        meta["codec_floor_pct"] = floor_pct(config.sample_rate, config.frame_ms)
    echo = EchoServer(config.compression) if config.floor_probes else None
    meta["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        outcome = asyncio.run(_swarm(config, raw_dir, server_pid, echo.url if echo else None, progress, voice))
    finally:
        if echo is not None:
            echo.stop()
    rec, generators = outcome.rec, outcome.generators
    meta["wall_s"] = round(rec.now(), 3)
    rec.close()
    meta["server"]["gateway_pids"] = sorted(outcome.sampler.gateways_seen)
    meta["client_parent_pid"] = os.getpid()
    if generators is None:
        meta["client_processes"] = [{"pid": os.getpid(), "sessions": config.sessions, "sids": f"0:{config.sessions}:1",
                                     "events": rec.count, "returncode": None}]
        meta["events"] = rec.count
    else:
        meta["client_processes"] = generators.info()
        parts = [rec.path, *(p for p in generators.parts if p.exists())]
        meta["events"] = merge(parts, raw_dir / EVENTS_FILE)
        for part in parts:
            part.unlink()
    (raw_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return raw_dir
