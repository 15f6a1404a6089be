"""The soak: a short one end to end (the 30-minute run is the same command), and its verdict on a leak."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from loadtest.soak import Sample, flatness


def test_a_short_soak_samples_the_server_and_finds_it_flat_and_settled(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shoal", "loadtest", "soak", "--serve", "stub", "--sessions", "4",
           "--duration", "20", "--ramp", "1", "--warmup", "2", "--sample-s", "0.5", "--floor-probes", "0",
           "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verdict = json.loads((out / "soak.json").read_text())
    assert verdict["flat"] is True and verdict["settled"]["ok"] is True, verdict
    assert verdict["run"]["sessions_ready"] == 4 and verdict["run"]["errors"] == 0
    assert verdict["tasks"]["start"] > verdict["settled"]["tasks"]["after"]  # tasks were counted under load
    rows = list(csv.DictReader(open(out / "soak.csv")))
    assert len(rows) >= 30 and float(rows[-1]["connections"]) == 0
    assert "flat" in proc.stdout and "settled" in proc.stdout


def test_a_leak_is_not_flat() -> None:
    leak = [Sample(t=float(t), rss_mb=100.0 + t, fds=20 + t // 10, tasks=50.0, connections=4.0) for t in range(100)]
    verdict = flatness(leak, warmup_s=5.0, until_s=95.0)
    assert verdict["flat"] is False and verdict["rss_mb"]["flat"] is False and verdict["tasks"]["flat"] is True
    steady = [Sample(t=float(t), rss_mb=100.0 + (t % 7), fds=20, tasks=50.0 + (t % 3), connections=4.0)
              for t in range(100)]
    assert flatness(steady, 5.0, 95.0)["flat"] is True
    assert flatness(steady[:8], 5.0, 95.0)["flat"] is None  # too short to tell
    # A bounded cache that fills in the first half and then holds is not a leak; its fill is reported.
    fills = [Sample(t=float(t), rss_mb=100.0 + min(t, 40) + (t % 3), fds=20, tasks=50.0, connections=4.0)
             for t in range(100)]
    verdict = flatness(fills, 5.0, 95.0)
    assert verdict["flat"] is True and verdict["rss_mb"]["fill"] > 20 and abs(verdict["rss_mb"]["per_min"]) < 5
