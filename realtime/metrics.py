"""Prometheus metrics of one gateway, in a registry of its own (no process globals).

With ``shoal serve --processes N`` the N gateway processes share one set of metrics through prometheus-client's
multiprocess mode: each process writes its values to files in ``multiprocess_dir`` and ``/metrics``, whichever
process answers it, sums them (counters and histograms: all processes, the dead ones included; open sessions,
connections and event-loop tasks: the live ones). What is read at scrape time in one process (its event loop's
tasks, its engine's counters) is written there once a second instead (``sample``): an engine in each process (the
stub, the built-in voice) and the pool's own counters (``pool_*``) are summed over the processes; the workers'
counters, which every process reads alike from the registry, are the most recent reading, not a sum; the pool's
view of how many workers there are is the largest.
prometheus-client chooses its mode when it is first imported, from ``PROMETHEUS_MULTIPROC_DIR``: the process that
starts the gateways sets it before they start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_TTFA_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_ready(directory: str) -> bool:
    """True if this process's prometheus-client writes its values to ``directory`` (it was imported with
    ``PROMETHEUS_MULTIPROC_DIR`` set to it)."""
    return values.ValueClass is not values.MutexValue and os.environ.get(MULTIPROCESS_ENV) == str(directory)


@contextlib.contextmanager
def multiprocess_env(directory: str | os.PathLike[str]) -> Iterator[None]:
    """``PROMETHEUS_MULTIPROC_DIR`` set to ``directory`` for the time of the block, as it was after: for what must
    see it now (a process spawned in the block inherits it; a multiprocess value opens its file), not for this
    process's prometheus-client, which chose its mode when it was imported."""
    before = os.environ.get(MULTIPROCESS_ENV)
    os.environ[MULTIPROCESS_ENV] = str(directory)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MULTIPROCESS_ENV, None)
        else:
            os.environ[MULTIPROCESS_ENV] = before


def shared_counter(directory: str | os.PathLike[str], name: str) -> Callable[[], None]:
    """``inc`` for a counter kept by a process that serves no metrics but whose events belong in them: the parent of
    several gateway processes counts the embedded Redis's restarts into their shared ``directory``. The gateways
    declare the same counter (at 0), so any scrape sums in the parent's count. The parent imported prometheus-client
    in single-process mode, so this value is made with the multiprocess value class directly."""
    with multiprocess_env(directory):  # read when the value opens its file, now
        value = values.MultiProcessValue()("counter", name, f"{name}_total", (), (), "")
    return lambda: value.inc(1.0)


class Metrics:
    def __init__(self, multiprocess_dir: str | os.PathLike[str] | None = None) -> None:
        self.multiprocess_dir = None if multiprocess_dir is None else str(multiprocess_dir)
        if self.multiprocess_dir is not None and not multiprocess_ready(self.multiprocess_dir):
            raise RuntimeError(f"prometheus-client was imported before {MULTIPROCESS_ENV} was set to "
                               f"{self.multiprocess_dir}: set it before the gateway process starts")
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        live = {"multiprocess_mode": "livesum"}  # a gauge of the processes alive now (ignored in one process)
        self.sessions_open = Gauge("shoal_sessions_open", "Open protocol sessions", registry=r, **live)
        self.connections_open = Gauge("shoal_connections_open", "Open WebSocket connections", registry=r, **live)
        self.turns = Counter("shoal_turns", "Finished turns by reason", ["reason"], registry=r)
        self.audio_seconds = Counter("shoal_audio_sent_seconds", "Seconds of audio sent to clients", registry=r)
        self.ttfa = Histogram(
            "shoal_ttfa_seconds", "Segment ready to first audio frame sent", buckets=_TTFA_BUCKETS, registry=r
        )
        self.errors = Counter("shoal_errors", "Error messages sent, by code", ["code"], registry=r)
        self.voices = Counter("shoal_voices_created", "Reference voices registered", registry=r)
        self.store_writes_retried = Counter(
            "shoal_store_writes_retried", "Turn writes that failed and were tried again", registry=r
        )
        self.store_turns_lost = Counter(
            "shoal_store_turns_lost", "Finished turns a closing connection could not store in time", registry=r
        )
        self.store_restarts = Counter("shoal_store_restarts", "Restarts of the embedded Redis", registry=r)
        self.slow_readers = Counter("shoal_slow_readers", "Connections dropped for not reading", registry=r)
        self.connection_failures = Counter(
            "shoal_connection_failures", "Connections ended by an internal failure (logged)", registry=r
        )
        # leaks show here first (a soak run watches it stay flat); read on the event loop, at scrape time (in
        # several processes: written every second by each, see ``sample``)
        self._tasks = Gauge("shoal_event_loop_tasks", "asyncio tasks alive on the gateway's event loop(s)",
                            registry=r, **live)
        self._engine_stats: Callable[[], Mapping[str, float]] | None = None
        self._engine_shared = False
        self._engine_gauges: dict[str, Gauge] = {}
        if self.multiprocess_dir is None:
            self._tasks.set_function(_loop_tasks)

    def add_engine(self, stats: Callable[[], Mapping[str, float]], shared: bool = False) -> None:
        """Export an engine's own counters (prefix cache, scheduler) as ``shoal_engine_*`` at scrape time.
        ``shared``: it is a pool of workers, whose counters (all but ``pool_*``) every gateway process sees alike."""
        if self.multiprocess_dir is None:
            self.registry.register(_EngineCollector(stats))
        else:
            self._engine_stats, self._engine_shared = stats, shared

    def sample(self) -> None:
        """Several processes: write what one process can only read now (tasks, engine counters) for the others'
        scrapes. Called on the event loop once a second, and before rendering. Nothing to do in one process."""
        if self.multiprocess_dir is None:
            return
        self._tasks.set(_loop_tasks())
        if self._engine_stats is None:
            return
        for key, value in self._engine_stats().items():
            gauge = self._engine_gauges.get(key)
            if gauge is None:
                gauge = Gauge(f"shoal_engine_{key}", f"engine {'counter' if key.endswith('_total') else 'gauge'} "
                              f"{key}", registry=None, multiprocess_mode=self._engine_mode(key))
                self._engine_gauges[key] = gauge
            gauge.set(float(value))

    def _engine_mode(self, key: str) -> str:
        if self._engine_shared and not key.startswith("pool_"):
            return "livemostrecent"  # the workers' own counters: the same in every process, the freshest wins
        if key in ("pool_workers", "pool_workers_registered"):
            return "livemax"  # each process's view of the same workers
        return "sum" if key.endswith("_total") else "livesum"  # this process's own work

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        self.sample()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)
        return generate_latest(merged)


def _loop_tasks() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped off the event loop: nothing to count
        return float("nan")


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, float]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        for key, value in sorted(self._stats().items()):
            name = f"shoal_engine_{key}"
            if key.endswith("_total"):
                family: Metric = CounterMetricFamily(name[: -len("_total")], f"engine counter {key}")
            else:
                family = GaugeMetricFamily(name, f"engine gauge {key}")
            family.add_metric([], float(value))
            yield family
