"""Quotas of one gateway process: open connections and live sessions per tenant and per client address, and the
``voice.create`` rate per tenant. Voices stored per tenant (count and bytes) are counted in the store instead
(``SessionStore.put_voice``), so they hold across gateways.

Every refusal is a ``QuotaExceeded`` naming its quota (the ``GatewayLimits`` field that sets it); the gateway sends
it as ``error quota``. Counters are dropped at zero, so they stay bounded by what is open.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from realtime.config import GatewayLimits

__all__ = ["Hold", "QuotaExceeded", "Quotas"]


class QuotaExceeded(Exception):
    def __init__(self, quota: str, message: str) -> None:
        super().__init__(f"quota {quota}: {message}")
        self.quota = quota


@dataclass
class Hold:
    """Connections or a session counted against a tenant and an address until ``release``d (idempotent)."""

    quotas: Quotas
    keys: tuple[tuple[str, str], ...]
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.quotas._drop(self.keys)


class Quotas:
    def __init__(self, limits: GatewayLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._open: Counter[tuple[str, str]] = Counter()
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when)
        self._clock = clock

    def hold(self, kind: str, tenant: str, address: str) -> Hold:
        """Count one more of ``kind`` (connections | sessions) for ``tenant`` and ``address``, or raise."""
        per_tenant = getattr(self.limits, f"{kind}_per_tenant")
        per_address = getattr(self.limits, f"{kind}_per_address")
        keys = ((f"{kind}_per_tenant", tenant), (f"{kind}_per_address", address))
        for (quota, who), most in zip(keys, (per_tenant, per_address)):
            if self._open[(quota, who)] >= most:
                what = "tenant" if quota.endswith("tenant") else "client address"
                raise QuotaExceeded(quota, f"this {what} has {most} {kind} open, the most allowed; close one first")
        for key in keys:
            self._open[key] += 1
        return Hold(self, keys)

    def voice_create(self, tenant: str) -> None:
        """Take one ``voice.create`` from the tenant's bucket (refilled at ``voice_creates_per_minute``)."""
        rate = self.limits.voice_creates_per_minute
        now = self._clock()
        tokens, when = self._buckets.get(tenant, (rate, now))
        tokens = min(rate, tokens + (now - when) * rate / 60.0)
        if tokens < 1.0:
            wait = (1.0 - tokens) * 60.0 / rate
            self._buckets[tenant] = (tokens, now)
            raise QuotaExceeded("voice_creates_per_minute",
                                f"at most {rate:g} voice.create a minute; try again in {wait:.1f} s")
        self._buckets[tenant] = (tokens - 1.0, now)

    def _drop(self, keys: tuple[tuple[str, str], ...]) -> None:
        for key in keys:
            self._open[key] -= 1
            if self._open[key] <= 0:
                del self._open[key]
