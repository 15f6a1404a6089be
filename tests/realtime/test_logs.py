"""The log rate limit and the in-process quotas, on a fake clock."""

from __future__ import annotations

import logging

import pytest

from realtime.config import GatewayLimits
from realtime.logs import RateLimit
from realtime.quotas import QuotaExceeded, Quotas


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("shoal.gateway", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_one_line_per_cause_per_second_with_the_count_held_back() -> None:
    clock = Clock()
    limit = RateLimit(clock=clock)
    passed = [limit.filter(record("session %s: store error", f"s{i}")) for i in range(100)]
    assert passed.count(True) == 1  # a hundred sessions, one cause
    assert limit.filter(record("another cause"))
    clock.t = 1.5
    line = record("session %s: store error", "s100")
    assert limit.filter(line)
    assert line.getMessage() == "session s100: store error [99 more like this in the last 1.5 s]"


def test_tracebacks_once_a_minute_then_one_line() -> None:
    clock = Clock()
    limit = RateLimit(clock=clock)
    first = record("bad frame", exc=UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert limit.filter(first) and first.exc_info is not None
    clock.t = 2.0
    second = record("bad frame", exc=ValueError("100% bad"))
    assert limit.filter(second) and second.exc_info is None
    assert second.getMessage() == "bad frame (ValueError: 100% bad)"
    clock.t = 70.0
    third = record("bad frame", exc=ValueError("x"))
    assert limit.filter(third) and third.exc_info is not None


def test_connection_quotas_per_tenant_and_address_are_given_back() -> None:
    quotas = Quotas(GatewayLimits(connections_per_tenant=3, connections_per_address=2))
    a = [quotas.hold("connections", "acme", "10.0.0.1") for _ in range(2)]
    with pytest.raises(QuotaExceeded) as info:
        quotas.hold("connections", "acme", "10.0.0.1")
    assert info.value.quota == "connections_per_address"
    quotas.hold("connections", "acme", "10.0.0.2")
    with pytest.raises(QuotaExceeded, match="connections_per_tenant"):
        quotas.hold("connections", "acme", "10.0.0.3")
    quotas.hold("connections", "globex", "10.0.0.3")  # another tenant has its own
    a[0].release()
    a[0].release()  # idempotent
    quotas.hold("connections", "acme", "10.0.0.1")


def test_voice_create_rate_refills() -> None:
    clock = Clock()
    quotas = Quotas(GatewayLimits(voice_creates_per_minute=2), clock=clock)
    quotas.voice_create("acme")
    quotas.voice_create("acme")
    with pytest.raises(QuotaExceeded, match="try again in 30.0 s"):
        quotas.voice_create("acme")
    quotas.voice_create("globex")
    clock.t = 30.0
    quotas.voice_create("acme")
