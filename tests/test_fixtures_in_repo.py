"""The golden fixtures live in the repository, so a plain clone runs every fidelity test, and no test looks outside."""

from __future__ import annotations

import re
from pathlib import Path

from tests.engine.dualar import CODEC, FIXTURES, MODEL_DIR

REPO = Path(__file__).resolve().parents[1]


def test_the_s2pro_tiny_fixtures_are_inside_the_repository() -> None:
    assert FIXTURES.is_relative_to(REPO / "tests" / "fixtures")
    assert (MODEL_DIR / "config.json").is_file() and CODEC.is_file()
    assert sorted(p.name for p in FIXTURES.glob("*.npz")) == [
        "a_slow_ar_prompt.npz", "b_fast_ar.npz", "c_greedy_generate.npz", "d_codec_decode.npz", "d_codec_encode.npz"]
    assert "3dd1f85" in (FIXTURES / "README.md").read_text()  # its provenance: fish-speech at that commit


def test_no_test_or_script_reaches_outside_the_repository() -> None:
    outside = re.compile(r"\.\./shared|parent\s*/\s*\"shared\"|parents\[\d\]\.parent|/work/shared")
    sources = [*REPO.glob("tests/**/*.py"), *REPO.glob("scripts/*"), *REPO.glob(".ci/*")]
    offenders = [str(p.relative_to(REPO)) for p in sources
                 if p.is_file() and p != Path(__file__) and outside.search(p.read_text(errors="replace"))]
    assert offenders == []
