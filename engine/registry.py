"""Engines by name: ``make_engine("espeak", workers=2)``.

Options are the fields of the engine's config dataclass; an unknown name or option is a ValueError.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.base import Synthesizer
from engine.espeak import EspeakConfig, EspeakSynthesizer
from engine.stub import StubConfig, StubSynthesizer

__all__ = ["ENGINE_NAMES", "make_engine"]


def _espeak(**options: object) -> Synthesizer:
    return EspeakSynthesizer(EspeakConfig(**options))  # type: ignore[arg-type]


def _stub(**options: object) -> Synthesizer:
    return StubSynthesizer(StubConfig(**options))  # type: ignore[arg-type]


def _s2pro(**options: object) -> Synthesizer:
    from engine.dualar.synthesizer import DualARConfig, DualARSynthesizer  # torch only when asked for

    return DualARSynthesizer(DualARConfig(**options))  # type: ignore[arg-type]


_FACTORIES: dict[str, Callable[..., Synthesizer]] = {"espeak": _espeak, "stub": _stub, "s2pro": _s2pro}
ENGINE_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_engine(name: str, **options: object) -> Synthesizer:
    """A new, not yet started engine. Raises ValueError for an unknown engine, option or option value."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINE_NAMES)})")
    try:
        return factory(**options)
    except TypeError as exc:  # an option the config dataclass does not have
        raise ValueError(f"bad options for engine {name!r}: {exc}") from exc
