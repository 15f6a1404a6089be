"""Shoal owns its process: what SGLang 0.5.23 does to the process that starts ``sglang.Engine``, and how it is undone.

What SGLang does (``entrypoints/engine.py``, ``utils/watchdog.py``, ``managers/tokenizer_manager.py``):

- ``Engine.__init__`` from the main thread replaces the process's SIGQUIT handler with one that kills the whole
  process tree, parent included; it starts a ``SubprocessWatchdog`` thread that SIGQUITs the parent as soon as a
  scheduler process exits with a non-zero code (a SIGTERM'd one exits with -15), and registers ``atexit`` shutdown
  that kills every child of the process, not only SGLang's.
- The tokenizer manager's first request (``auto_create_handle_loop``), from the main thread, puts SIGTERM and
  SIGQUIT handlers on the running event loop: SIGTERM drains, then kills every child (the embedded Redis too) and
  ``sys.exit``s from inside the loop; SIGQUIT kills the tree.

What Shoal does instead (:func:`take_over`, right after the engine starts, on the event loop's thread): runs the
tokenizer manager's loop set-up itself with the signal handlers as they were before and restored after, stops
SGLang's watchdog, and watches SGLang's processes with a :class:`ChildMonitor` that reports a crash to the
synthesizer (which then fails its requests and reports unhealthy) instead of signalling anybody.
:func:`stop_engine` stops the monitor and the watchdog *before* terminating SGLang's processes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["ChildMonitor", "SignalState", "keep_signals", "stop_engine", "stop_watchdog", "take_over"]

log = logging.getLogger(__name__)

_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGQUIT", None)) if s is not None)


class SignalState:
    """The process's handlers for SIGTERM and SIGQUIT, and the event loop's (asyncio's own table), at one moment."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.process = {sig: signal.getsignal(sig) for sig in _SIGNALS}
        table = getattr(loop, "_signal_handlers", None) if loop is not None else None
        self.on_loop = {sig: table[sig] for sig in _SIGNALS if isinstance(table, dict) and sig in table}

    def restore(self) -> None:
        """Put every handler back as it was (main thread only; elsewhere nothing can have changed them)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _SIGNALS:
            if self.loop is not None:
                with contextlib.suppress(Exception):
                    self.loop.remove_signal_handler(sig)
            handle = self.on_loop.get(sig)
            if handle is not None and self.loop is not None:
                self.loop.add_signal_handler(sig, handle._callback, *handle._args)
            elif self.process[sig] is not None:
                signal.signal(sig, self.process[sig])


@contextlib.contextmanager
def keep_signals(loop: asyncio.AbstractEventLoop | None = None) -> Iterator[SignalState]:
    """Whatever the body installs for SIGTERM / SIGQUIT (process-wide or on ``loop``) is undone at the end."""
    state = SignalState(loop)
    try:
        yield state
    finally:
        state.restore()


def stop_watchdog(engine: Any) -> None:
    """Stop SGLang's ``SubprocessWatchdog`` (it would SIGQUIT this process when a scheduler exits) and forget it."""
    manager = getattr(engine, "tokenizer_manager", None)
    watchdog = getattr(manager, "_subprocess_watchdog", None)
    if watchdog is not None:
        watchdog.stop()
        manager._subprocess_watchdog = None


class ChildMonitor:
    """Polls SGLang's processes; calls ``on_exit(message)`` once when one has died with a non-zero code."""

    def __init__(self, pids: list[int], on_exit: Callable[[str], None], interval: float = 0.5) -> None:
        self.pids, self.on_exit, self.interval = list(pids), on_exit, interval
        # the Process objects, held from the start: once reaped, active_children() forgets them and their code
        self._processes = {p.pid: p for p in multiprocessing.active_children() if p.pid in self.pids}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.pids and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shoal-sglang-monitor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.interval)
        self._thread = None

    def check(self) -> str | None:
        """A message naming the first dead process, or None while all live (or exited cleanly)."""
        for pid in self.pids:
            process = self._processes.get(pid)
            if process is not None:
                if process.is_alive() or process.exitcode in (None, 0):
                    continue
                return f"SGLang process {pid} exited with code {process.exitcode}"
            if not _pid_alive(pid):
                return f"SGLang process {pid} is gone"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            message = self.check()
            if message is not None and not self._stop.is_set():
                self.on_exit(message)
                return


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process under a reused pid
        return True
    return True


def take_over(engine: Any, on_exit: Callable[[str], None]) -> ChildMonitor:
    """Right after ``sglang.Engine`` started, on the thread of the event loop that will serve requests: set up the
    tokenizer manager's loop now with the signal handlers kept, swap SGLang's watchdog for a :class:`ChildMonitor`.
    """
    loop = asyncio.get_running_loop()
    manager = getattr(engine, "tokenizer_manager", None)
    create = getattr(manager, "auto_create_handle_loop", None)
    if create is not None:
        with keep_signals(loop):
            create()  # SGLang binds its handle loop to this loop here, and would have set its signal handlers
    stop_watchdog(engine)
    atexit.unregister(engine.shutdown)  # it kills every child of this process (the embedded Redis too): never at exit
    monitor = ChildMonitor(list(engine.get_all_child_pids()), on_exit)
    monitor.start()
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGQUIT"):
        # SGLang's scheduler and detokenizer SIGQUIT their parent on any failure (and its hard watchdog on a hung
        # step); with the default disposition that would end Shoal. Report it to the engine instead.
        with contextlib.suppress(ValueError, RuntimeError):  # no signal handling on this loop: the default stays
            loop.add_signal_handler(signal.SIGQUIT, on_exit, "SGLang signalled a failure (SIGQUIT)")
    return monitor


def stop_engine(engine: Any, monitor: ChildMonitor | None = None, timeout: float = 30.0) -> None:
    """Stop the SGLang processes this engine started (by pid; never other children of this process): the monitor
    and SGLang's watchdog first (a terminated scheduler exits with -15, which the watchdog reads as a crash), then
    SIGTERM, a wait, SIGKILL for stragglers. SGLang's ``atexit`` shutdown is unregistered (it kills every child)."""
    if monitor is not None:
        monitor.stop()
    with contextlib.suppress(ValueError, RuntimeError, AttributeError):  # the SIGQUIT report of take_over
        asyncio.get_running_loop().remove_signal_handler(signal.SIGQUIT)
    stop_watchdog(engine)
    pids = set(engine.get_all_child_pids())
    children = {p.pid: p for p in multiprocessing.active_children() if p.pid in pids}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        process = children.get(pid)
        if process is not None:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
    atexit.unregister(engine.shutdown)
