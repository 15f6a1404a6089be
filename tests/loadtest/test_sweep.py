"""The sweep's search, with a fake run: climb until a level fails, bisect, report the largest passing level."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest.config import SwarmConfig
from loadtest.sweep import sweep

LIMIT = 230  # the fake server holds this many sessions


def fake_summary(n: int) -> dict[str, Any]:
    p99 = 20.0 if n <= LIMIT else 80.0
    d = {"p50": 10.0, "p90": 15.0, "p99": p99, "max": p99, "mean": 11.0, "n": n}
    cpu = {"mean": n / 5, "max": n / 4, "p50": n / 5, "p90": n / 5, "p99": n / 5, "n": 10}
    return {
        "sessions": n, "sessions_ready": n, "turns": 3 * n, "turns_unfinished": 0, "errors": 0, "errors_by_code": {},
        "ttfa_ms": d, "gap_ms": d, "overhead_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0},
        "underruns": 0, "streams_mean": n * 0.8, "client_saturated": False, "machine_busy": False,
        "cpu": {"server": cpu, "server_children": cpu, "client": cpu}, "sanity": {"ok": True},
    }


def test_sweep_finds_the_capacity_between_steps(tmp_path: Path) -> None:
    calls: list[int] = []

    def run(config: SwarmConfig, out_dir: Path, *args: Any, **kw: Any) -> dict[str, Any]:
        calls.append(config.sessions)
        out_dir.mkdir(parents=True)
        return fake_summary(config.sessions)

    base = SwarmConfig(url="ws://127.0.0.1:9/v1/realtime", sessions=1, duration_s=20)
    result = sweep(base, tmp_path, None, {}, start=100, step=100, max_sessions=1000, ttfa_p99_ms=50.0,
                   max_underruns=0, refine=2, settle_s=0.0, progress=None, run=run)
    assert calls == [100, 200, 300, 250, 225]
    assert result["capacity"] == 225 and result["first_failure"] == 250
    assert [s["pass"] for s in result["steps"]] == [True, True, True, False, False]
    assert json.loads((tmp_path / "sweep.json").read_text())["capacity"] == 225
    assert "Capacity: <b>225</b>" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "sweep.png").exists()
