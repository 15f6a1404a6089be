"""Tests of the S2 Pro dual-AR engine against the golden fixtures in ``shared/fixtures/s2pro-tiny``."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parents[3]
_CANDIDATES = (_ROOT / "shared" / "fixtures" / "s2pro-tiny", _ROOT.parent / "shared" / "fixtures" / "s2pro-tiny")
FIXTURES: Path = next((p for p in _CANDIDATES if (p / "model" / "config.json").is_file()), _CANDIDATES[-1])
MODEL_DIR = FIXTURES / "model"

requires_fixtures = pytest.mark.skipif(
    not (MODEL_DIR / "config.json").is_file(), reason=f"s2pro-tiny fixtures not found (looked in {_CANDIDATES})"
)


@functools.cache
def golden(name: str) -> dict[str, np.ndarray]:
    """One fixture file (``a``, ``b``, ``c``) as a dict of arrays."""
    path = next(FIXTURES.glob(f"{name}_*.npz"))
    with np.load(path) as data:
        return {key: data[key] for key in data.files}
