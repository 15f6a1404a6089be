"""Shoal owns its process: closing the SGLang engine, or a SIGTERM to Shoal, must not kill it (``process``).

Against the stand-in engine that behaves like SGLang 0.5.23 towards its parent (``fakes.FakeSGLangEngine`` with a
child process: the watchdog SIGQUITs the parent when the child exits -15, a SIGQUIT kills the tree, the first
request sets SIGTERM / SIGQUIT handlers on the loop). Each case runs in a subprocess, since the failure is death.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.sglang.process import ChildMonitor, keep_signals, stop_engine
from tests.engine.sglang.fakes import FakeWatchdog

ROOT = Path(__file__).resolve().parents[3]


def run_child(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.engine.sglang.lifecycle_child", mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_closing_the_engine_leaves_the_process_alive() -> None:
    done = run_child("close")
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert "frames 6" in done.stdout
    assert "closed; sglang child alive False" in done.stdout  # SGLang's processes did stop
    assert "alive after close" in done.stdout


def test_a_sigterm_reaches_shoal_not_sglang() -> None:
    done = run_child("sigterm")
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert "shoal handled SIGTERM; sglang child alive True" in done.stdout  # SGLang's handler would kill it
    assert "alive after close" in done.stdout


def test_keep_signals_undoes_handlers_set_on_the_loop_and_the_process() -> None:
    async def body() -> tuple[object, bool]:
        loop = asyncio.get_running_loop()
        mine = []
        loop.add_signal_handler(signal.SIGTERM, mine.append, "shoal")
        before_quit = signal.getsignal(signal.SIGQUIT)
        with keep_signals(loop):
            loop.add_signal_handler(signal.SIGTERM, mine.append, "sglang")
            loop.add_signal_handler(signal.SIGQUIT, mine.append, "sglang-quit")
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        loop.remove_signal_handler(signal.SIGTERM)
        return mine, signal.getsignal(signal.SIGQUIT) == before_quit

    handled, quit_restored = asyncio.run(body())
    assert handled == ["shoal"] and quit_restored


def test_stop_engine_stops_the_watchdog_before_terminating(monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminated scheduler exits -15; with SGLang's watchdog still running that is a SIGQUIT to us."""
    quits: list[int] = []
    monkeypatch.setattr(signal, "SIGQUIT", signal.SIGQUIT)
    previous = signal.signal(signal.SIGQUIT, lambda sig, frame: quits.append(sig))
    try:
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
        child.start()

        class Engine:
            tokenizer_manager = type("TM", (), {})()

            def get_all_child_pids(self) -> list[int]:
                return [child.pid]

            def shutdown(self) -> None:
                pass

        engine = Engine()
        engine.tokenizer_manager._subprocess_watchdog = FakeWatchdog([child], interval=0.05)
        stop_engine(engine, timeout=5)
        time.sleep(0.3)
        assert not child.is_alive() and child.exitcode == -signal.SIGTERM
        assert quits == [] and engine.tokenizer_manager._subprocess_watchdog is None
    finally:
        signal.signal(signal.SIGQUIT, previous)


def _crash_soon() -> None:
    time.sleep(0.3)
    os._exit(3)


def test_the_monitor_reports_a_crashed_sglang_process_instead_of_signalling() -> None:
    child = multiprocessing.get_context("fork").Process(target=_crash_soon, daemon=True)
    child.start()
    reports: list[str] = []
    monitor = ChildMonitor([child.pid], reports.append, interval=0.05)
    monitor.start()
    deadline = time.monotonic() + 5
    while not reports and time.monotonic() < deadline:
        time.sleep(0.05)
    monitor.stop()
    assert len(reports) == 1 and f"{child.pid} exited with code 3" in reports[0]
