"""Engines by name, the one place engines are built: ``make_engine("espeak", workers=2)``.

Options are the fields of the engine's config dataclass; an unknown name or option is a ValueError. ``s2pro`` takes
``backend``: ``torch`` (default: ``DualARConfig``'s fields) or ``sglang`` (``SGLangConfig``'s). ``pool`` takes
``source`` (where the live workers come from: ``engine.pool.MemberSource``) and ``PoolConfig``'s fields. The CLI,
the server, the worker processes and the tests all build engines here.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.base import Synthesizer
from engine.espeak import EspeakConfig, EspeakSynthesizer
from engine.stub import StubConfig, StubSynthesizer

__all__ = ["ENGINE_NAMES", "S2PRO_BACKENDS", "make_engine"]

S2PRO_BACKENDS = ("torch", "sglang")


def _espeak(**options: object) -> Synthesizer:
    return EspeakSynthesizer(EspeakConfig(**options))  # type: ignore[arg-type]


def _stub(**options: object) -> Synthesizer:
    return StubSynthesizer(StubConfig(**options))  # type: ignore[arg-type]


def _pool(source: object, **options: object) -> Synthesizer:
    from engine.pool import PoolConfig, PoolEngine

    return PoolEngine(source, PoolConfig(**options))  # type: ignore[arg-type]


def _s2pro(backend: str = "torch", **options: object) -> Synthesizer:
    if backend == "sglang":  # torch (and, at start, sglang) only when asked for
        from engine.sglang import SGLangConfig, SGLangSynthesizer

        return SGLangSynthesizer(SGLangConfig(**options))  # type: ignore[arg-type]
    if backend != "torch":
        raise ValueError(f"unknown s2pro backend {backend!r} (known: {', '.join(S2PRO_BACKENDS)})")
    from engine.dualar.synthesizer import DualARConfig, DualARSynthesizer

    return DualARSynthesizer(DualARConfig(**options))  # type: ignore[arg-type]


_FACTORIES: dict[str, Callable[..., Synthesizer]] = {"espeak": _espeak, "stub": _stub, "s2pro": _s2pro, "pool": _pool}
ENGINE_NAMES: tuple[str, ...] = ("espeak", "stub", "s2pro")  # what `--engine` offers; "pool" is `--workers N`


def make_engine(name: str, **options: object) -> Synthesizer:
    """A new, not yet started engine. Raises ValueError for an unknown engine, option or option value."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown engine {name!r} (known: {', '.join(_FACTORIES)})")
    try:
        return factory(**options)
    except TypeError as exc:  # an option the config dataclass does not have
        raise ValueError(f"bad options for engine {name!r}: {exc}") from exc
