"""The GPU check must run on the lent machine as it is (no install, no network): its dry run, here, with the server's
dependencies made unimportable the way they are on that machine's image, completes and writes its whole report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_dry_run_completes_on_the_gpu_images_packages(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "PYTHONPATH": str(Path(__file__).parent / "gpu_image")}
    run = subprocess.run(["bash", "scripts/gpu-check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "pytest_asyncio: not importable" in (tmp_path / "preflight.txt").read_text()  # the simulation was on
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    failed = {name: s["error"] for name, s in report["sections"].items() if s.get("error")}
    assert not failed, failed
    for name in ("equality", "decode", "prefill", "codec", "rtf", "ttfa", "tests"):
        assert report["sections"][name].get("result"), name
    assert report["sections"]["tests"]["result"]["exit_code"] == 0
    assert set(report["targets"]) == {"ttfa_turn5_p50_ms", "aggregate_fps_max", "rtf_c1"}
    for name in ("gpu-check.txt", "gpu-check.png", "gpu-check.log", "tests.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "gpu-check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
