"""One run end to end: (optionally profile the server), swarm, statistics, report; and the re-analysis step."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from loadtest.config import SwarmConfig
from loadtest.cpu import gateway_pids
from loadtest.profile import Profiler
from loadtest.report import write_report
from loadtest.stats import analyse, write_turns_csv
from loadtest.swarm import run_swarm

RAW_DIR = "raw"
SUMMARY_FILE = "summary.json"


def analyse_dir(
    out_dir: Path,
    ttfa_p99_ms: float | None = None,
    max_underruns: int | None = None,
    profile: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The statistics step: raw events in ``out_dir/raw`` -> summary.json, turns.csv, report.html."""
    a = analyse(out_dir / RAW_DIR, ttfa_p99_ms, max_underruns)
    if profile is None and (out_dir / "profile.json").exists():
        profile = json.loads((out_dir / "profile.json").read_text())
    extra = ""
    if profile is not None:
        a.summary["profile"] = {
            "busy_share": profile.get("busy_share"),
            "top_inclusive": profile.get("inclusive", [])[:15],
            "top_self": profile.get("self", [])[:15],
        }
        extra = _profile_html(profile)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(a.summary, indent=2) + "\n")
    write_turns_csv(out_dir / "turns.csv", a.turns)
    write_report(a, out_dir, extra)
    return a.summary


def _profile_html(profile: dict[str, Any]) -> str:
    import html

    def rows(key: str) -> str:
        return "".join(
            f"<tr><td>{r['share'] * 100:.1f} %</td><td>{html.escape(r['function'])}</td></tr>" for r in profile.get(key, [])[:25]
        )

    busy = profile.get("busy_share")
    return (
        f"<h2>Server profile (py-spy, busy share {'–' if busy is None else f'{busy * 100:.0f} %'} of the window)</h2>"
        "<p>Share of busy samples. Inclusive: in the function or anything it called.</p>"
        f"<table><tr><th>inclusive</th><th>function</th></tr>{rows('inclusive')}</table>"
        f"<h3>Self time</h3><table><tr><th>self</th><th>function</th></tr>{rows('self')}</table>"
    )


def run_once(
    config: SwarmConfig,
    out_dir: Path,
    server_pid: int | None,
    server_info: dict[str, Any] | None = None,
    ttfa_p99_ms: float | None = None,
    max_underruns: int | None = None,
    profile: bool = False,
    progress: TextIO | None = sys.stderr,
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    profiler = None
    if profile:
        if server_pid is None:
            raise RuntimeError("--profile needs the server's pid (use --serve, or --server-pid)")
        window = max(1.0, config.duration_s - config.measure_from_s)
        # several gateway processes (shoal serve --processes N): profile the first; the parent only supervises
        port = urlsplit(config.url).port
        gateways = gateway_pids(server_pid, port) if port is not None else []
        profiler = Profiler(gateways[0] if gateways else server_pid, out_dir, window, delay_s=config.measure_from_s)
    run_swarm(config, out_dir / RAW_DIR, server_pid, server_info, progress)
    summary_profile = profiler.wait(timeout_s=30.0) if profiler is not None else None
    return analyse_dir(out_dir, ttfa_p99_ms, max_underruns, summary_profile)
