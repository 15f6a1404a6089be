"""Real ``shoal worker`` processes serving the stub engine over the worker RPC, for pool tests and the contract."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.pool import PoolMember

READY = re.compile(r"shoal worker: (\S+) listening on (\S+):(\d+)")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Worker:
    id: str
    proc: subprocess.Popen[str]
    port: int

    @property
    def member(self) -> PoolMember:
        return PoolMember(self.id, "127.0.0.1", self.port)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def spawn(ids: list[str], *engine_args: str) -> list[Worker]:
    """Unregistered stub workers on free loopback ports (more engine options after the defaults win)."""
    procs = []
    for worker_id in ids:
        cmd = [sys.executable, "-m", "realtime", "worker", "--no-register", "--id", worker_id, "--engine", "stub",
               "--stub-ttft-ms", "5", "--stub-frame-ms", "1", *engine_args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT))
    workers = []
    for worker_id, proc in zip(ids, procs, strict=True):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = READY.search(line)
        assert m and m.group(1) == worker_id, line
        workers.append(Worker(worker_id, proc, int(m.group(3))))
    return workers


def stop(workers: list[Worker]) -> None:
    for w in workers:
        if w.proc.poll() is None:
            w.proc.terminate()
            w.proc.wait(10)


@contextmanager
def running(ids: list[str], *engine_args: str) -> Iterator[list[Worker]]:
    workers = spawn(ids, *engine_args)
    try:
        yield workers
    finally:
        stop(workers)
