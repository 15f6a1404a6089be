"""The one error of the ``sessions`` package."""

from __future__ import annotations

__all__ = ["StoreError"]


class StoreError(Exception):
    """The session store or the worker registry failed: Redis unreachable or timed out, a rejected write, or a
    record that does not decode. Every Redis failure in ``sessions`` is raised as this."""
