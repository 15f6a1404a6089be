"""Where the server's time goes: py-spy samples the server process during the measured window.

``py-spy record --nonblocking`` (the server is never paused) writes collapsed stacks; :func:`summarise` turns
them into the share of busy samples per function, inclusive (the function or anything it calls) and self (the
function's own code). Idle samples (threads waiting in the event loop's poll) are not recorded, so
``busy_share`` is the fraction of the recording in which the main thread was running Python or C code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE_HZ = 250


def find_py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    """A py-spy recording of ``pid`` from now for ``duration_s``, written to ``out_dir/profile.txt``."""

    def __init__(self, pid: int, out_dir: Path, duration_s: float, delay_s: float = 0.0) -> None:
        exe = find_py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install -e '.[loadtest]')")
        self.path = out_dir / "profile.txt"
        self.duration_s = max(1, int(duration_s))
        self.log = out_dir / "py-spy.log"
        # sleep inside the child so the recording covers the measured window, not the ramp
        script = (
            f"import subprocess,sys,time; time.sleep({delay_s:.3f}); "
            f"sys.exit(subprocess.call({[exe, 'record', '--pid', str(pid), '--rate', str(RATE_HZ), '--nonblocking', '--format', 'raw', '--duration', str(self.duration_s), '--output', str(self.path)]!r}))"
        )
        self._logf = open(self.log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdout=self._logf, stderr=subprocess.STDOUT)

    def wait(self, timeout_s: float) -> dict[str, Any] | None:
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._logf.close()
        if not self.path.exists():
            return None
        summary = summarise(self.path, self.duration_s * RATE_HZ)
        (self.path.parent / "profile.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _frame_key(frame: str) -> str:
    """'name (path:line)' -> 'name (path)'; paths shortened to the package-relative part."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0] if where else ""
    for marker in ("site-packages/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3.":
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    return f"{name} ({path})" if path else name


def summarise(path: Path, expected_samples: int, top: int = 40) -> dict[str, Any]:
    """Busy share and the top functions (inclusive and self) from py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        keys = [_frame_key(f) for f in frames]
        for key in set(keys):
            inclusive[key] += count
        own[keys[-1]] += count
        top_pkg = {k.split("(")[-1].split("/")[0] for k in keys}
        for pkg in top_pkg:
            files[pkg.rstrip(")")] += count

    def table(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": k, "share": round(v / total, 4), "samples": v} for k, v in c.most_common(top)] if total else []

    return {
        "samples": total,
        "expected_samples": expected_samples,
        "busy_share": round(total / expected_samples, 4) if expected_samples else None,
        "inclusive": table(inclusive),
        "self": table(own),
        "by_package": table(files),
    }
