"""Prometheus metrics of one gateway, in a registry of its own (no process globals)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_TTFA_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_open = Gauge("shoal_sessions_open", "Open protocol sessions", registry=r)
        self.connections_open = Gauge("shoal_connections_open", "Open WebSocket connections", registry=r)
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
        # leaks show here first (a soak run watches it stay flat); read on the event loop, at scrape time
        Gauge("shoal_event_loop_tasks", "asyncio tasks alive on the gateway's event loop", registry=r).set_function(
            _loop_tasks)

    def add_engine(self, stats: Callable[[], Mapping[str, float]]) -> None:
        """Export an engine's own counters (prefix cache, scheduler) as ``shoal_engine_*`` at scrape time."""
        self.registry.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
