"""CI replays the fuzzers' corpus (seeds and everything atheris found worth keeping) through the same targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_corpus_replays_clean(name: str) -> None:
    files = sorted((CORPUS / name).iterdir())
    assert len(files) >= 20, f"the {name} corpus is missing"
    for path in files:
        try:
            TARGETS[name](path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{path.name}: {exc!r}") from exc
