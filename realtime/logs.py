"""Logs that a client cannot flood: one line per cause per second, with a count of the ones held back.

A client reconnecting with invalid UTF-8 text frames made uvicorn log 342 ERROR tracebacks a second; a process out
of file descriptors, thousands. ``RateLimit`` is a filter on the log handlers: a cause is the logger, level and
message template (not its arguments, so "session %s: ..." from a thousand sessions is one cause); the first record
of a cause in each period goes out, with a note of how many like it were held back since the last one, and with
its traceback only once a minute (the other lines name the exception in one line).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

__all__ = ["RateLimit", "rate_limit_handlers"]


class RateLimit(logging.Filter):
    def __init__(self, period_s: float = 1.0, traceback_period_s: float = 60.0, max_causes: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.period_s = period_s
        self.traceback_period_s = traceback_period_s
        self.max_causes = max_causes
        self._clock = clock
        self._causes: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()  # -> [last, held, traceback]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg)[:200])
        now = self._clock()
        cause = self._causes.get(key)
        if cause is None:
            cause = self._causes[key] = [now, 0.0, now]
            while len(self._causes) > self.max_causes:
                self._causes.popitem(last=False)
            return True
        self._causes.move_to_end(key)
        last, held, traceback_at = cause
        if now - last < self.period_s:
            cause[1] = held + 1
            return False
        if held:
            _append(record, f" [{held:.0f} more like this in the last {now - last:.1f} s]")
        if record.exc_info and now - traceback_at < self.traceback_period_s:
            exc = record.exc_info[1]
            _append(record, f" ({type(exc).__name__}: {exc})")
            record.exc_info, record.exc_text = None, None
        else:
            cause[2] = now
        cause[0], cause[1] = now, 0.0
        return True


def _append(record: logging.LogRecord, text: str) -> None:
    record.msg = f"{record.msg}{text.replace('%', '%%') if record.args else text}"


def rate_limit_handlers(loggers: Iterable[str | None], period_s: float = 1.0) -> RateLimit:
    """Put one ``RateLimit`` on every handler of these loggers (None: the root logger)."""
    limit = RateLimit(period_s)
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RateLimit) for f in handler.filters):
                handler.addFilter(limit)
    return limit
