"""Capacity: raise concurrency step by step until TTFA p99 or underruns break a threshold.

Levels ``start, start + step, ...`` up to ``max_sessions``; the first failing level ends the climb, then
``refine`` bisection steps narrow the gap between the last passing and the first failing level. A level passes
when every session was ready, nothing errored, no turn was left unfinished, the run is sane, TTFA p99 is within
the threshold and underruns are at most the allowed number. Capacity is the largest passing level. Each level is
a complete run in ``out/sessions-NNNN/``; ``sweep.json`` and ``report.html`` summarise them. On a shared machine,
``quiet_wait_s`` waits for the other processes to go quiet before each level, and a level during which they were
busy anyway is run again (at most ``busy_retries`` times; its row says ``machine_busy`` if it never got quiet).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from loadtest.config import MAX_SESSIONS, SwarmConfig
from loadtest.cpu import wait_quiet
from loadtest.report import write_sweep_report
from loadtest.runner import run_once
from loadtest.stats import within


def _step_row(n: int, summary: dict[str, Any], ok: bool, rel: str) -> dict[str, Any]:
    cpu = summary["cpu"]
    return {
        "sessions": n,
        "dir": rel,
        "pass": ok,
        "streams_mean": summary["streams_mean"],
        "ttfa_ms": summary["ttfa_ms"],
        "gap_ms": summary["gap_ms"],
        "overhead_ms": summary["overhead_ms"],
        "underruns": summary["underruns"],
        "errors": summary["errors"],
        "errors_by_code": summary["errors_by_code"],
        "server_cpu": cpu["server"]["mean"],
        "server_cpu_per_stream": (summary.get("headline") or {}).get("server_cpu_per_stream"),
        "server_children_cpu": cpu["server_children"]["mean"],
        "client_cpu": cpu["client"]["mean"],
        "client_saturated": summary["client_saturated"],
        "sane": summary["sanity"]["ok"],
        "machine_busy": summary.get("machine_busy", False),
    }


def sweep(
    base: SwarmConfig,
    out_dir: Path,
    server_pid: int | None,
    server_info: dict[str, Any] | None,
    start: int,
    step: int,
    max_sessions: int,
    ttfa_p99_ms: float,
    max_underruns: int,
    refine: int = 2,
    settle_s: float = 3.0,
    quiet_wait_s: float = 0.0,
    busy_retries: int = 0,
    progress: TextIO | None = sys.stderr,
    run: Callable[..., dict[str, Any]] = run_once,
) -> dict[str, Any]:
    if not 1 <= start <= max_sessions <= MAX_SESSIONS or step < 1:
        raise ValueError("need 1 <= start <= max_sessions and step >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, Any]] = {}

    def level(n: int) -> bool:
        if n in results:
            return bool(results[n]["pass"])
        rel = f"sessions-{n:04d}"
        if progress is not None:
            progress.write(f"sweep: {n} sessions\n")
            progress.flush()
        for attempt in range(1 + busy_retries):  # bounded: a level measured while the machine was busy is redone
            if quiet_wait_s > 0:
                wait_quiet(quiet_wait_s)
            summary = run(replace(base, sessions=n), out_dir / rel, server_pid, server_info, ttfa_p99_ms,
                          max_underruns, progress=progress)
            if not summary.get("machine_busy"):
                break
            if progress is not None:
                progress.write(f"sweep: {n} sessions: other processes were busy (attempt {attempt + 1})\n")
        ok = within(summary, ttfa_p99_ms, max_underruns)
        results[n] = _step_row(n, summary, ok, rel)
        if progress is not None:
            st = results[n]
            progress.write(
                f"sweep: {n} sessions -> ttfa p99 {st['ttfa_ms']['p99']} ms, underruns {st['underruns']}, "
                f"errors {st['errors']}, server cpu {st['server_cpu']} % ({st['server_cpu_per_stream']} per "
                f"stream): {'pass' if ok else 'FAIL'}\n"
            )
        time.sleep(settle_s)  # let the server close the last level's sessions
        return ok

    last_pass, first_fail = 0, None
    levels = list(range(start, max_sessions + 1, step))
    for n in levels[:1000]:
        if level(n):
            last_pass = n
        else:
            first_fail = n
            break
    lo, hi = last_pass, first_fail
    for _ in range(refine):  # bounded bisection between the last pass and the first failure
        if hi is None or hi - lo <= max(1, step // 8):
            break
        mid = (lo + hi) // 2 if lo else max(1, hi // 2)
        if mid in (lo, hi):
            break
        if level(mid):
            lo = mid
        else:
            hi = mid
    capacity = max([n for n, r in results.items() if r["pass"]], default=0)
    failing = results.get(hi) if hi is not None else None
    out = {
        "capacity": capacity,
        "first_failure": hi,
        "ttfa_p99_ms": ttfa_p99_ms,
        "max_underruns": max_underruns,
        "limited_by_client": bool(failing and failing["client_saturated"]),
        "reached_max": first_fail is None,
        "config": base.to_json(),
        "server": server_info,
        "steps": [results[n] for n in sorted(results)],
    }
    (out_dir / "sweep.json").write_text(json.dumps(out, indent=2) + "\n")
    write_sweep_report(out, out_dir)
    return out
