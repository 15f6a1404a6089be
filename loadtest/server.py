"""Optionally start the server under test: ``shoal serve --port 0`` on loopback, as a separate process.

Only the command line is used (the load test imports nothing of the server). Its output goes to a log file;
the URL comes from the line that names the port it got. With ``processes`` (``shoal serve --processes N|auto``:
N gateway processes sharing the port, under a supervising parent) the process started is the parent, and the
gateways are the processes of its tree listening on the port (:func:`loadtest.cpu.gateway_pids`); the parent
names the port only once every gateway listens.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest.cpu import gateway_pids

_LISTEN = re.compile(r"listening on http://([\d.]+):(\d+)/")


class ServerProcess:
    def __init__(self, engine: str, log_path: Path, extra: list[str] | None = None, timeout_s: float = 60.0,
                 processes: str | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="shoal-loadtest-")
        cmd = [
            sys.executable, "-m", "realtime", "serve", "--host", "127.0.0.1", "--port", "0",
            "--data-dir", str(Path(self._tmp.name) / "data"), "--engine", engine,
            # every simulated client comes from 127.0.0.1: lift the per-address quotas meant for real clients
            "--limit", "connections_per_address=100000", "--limit", "sessions_per_address=100000", *(extra or []),
            *(["--processes", processes] if processes is not None else []),
        ]
        self.command = cmd
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.port = 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = _LISTEN.search(log_path.read_text(errors="replace"))
            if m:
                self.port = int(m.group(2))
                break
            time.sleep(0.05)
        if not self.port:
            self.stop()
            raise RuntimeError(f"shoal serve did not start; see {log_path}:\n{log_path.read_text(errors='replace')[-2000:]}")
        self.gateways = gateway_pids(self.pid, self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._tmp.cleanup()
        return self.proc.returncode
