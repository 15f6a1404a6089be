"""Tests of the S2 Pro dual-AR engine against the golden fixtures in ``tests/fixtures/s2pro-tiny`` (in the repository;
its README says how the reference implementation made them)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "s2pro-tiny"
MODEL_DIR = FIXTURES / "model"
CODEC = FIXTURES / "codec" / "codec.pth"


@functools.cache
def golden(name: str) -> dict[str, np.ndarray]:
    """One fixture file (``a``, ``b``, ``c``) as a dict of arrays."""
    path = next(FIXTURES.glob(f"{name}_*.npz"))
    with np.load(path) as data:
        return {key: data[key] for key in data.files}
