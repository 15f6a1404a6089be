"""Coverage-guided fuzzing of the protocol decoder and the turn machine with atheris (``pip install '.[fuzz]'``).

    python -m tests.fuzz.fuzz protocol [libFuzzer options] [-max_total_time=600]
    python -m tests.fuzz.fuzz turns -max_total_time=600

Runs from the committed corpus (``tests/fuzz/corpus/TARGET``) and adds what it finds there; CI replays that
corpus (``tests/fuzz/test_corpus.py``). ``scripts/fuzz.sh`` runs both for a while. A crash leaves
``crash-*`` in the working directory: add it to the corpus once fixed, so CI keeps it fixed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["realtime", "tests.realtime.test_turns", "tests.fuzz"]):
    from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.fuzz {{{'|'.join(TARGETS)}}} [libFuzzer options]")
    name = argv[1]
    corpus = CORPUS / name
    corpus.mkdir(parents=True, exist_ok=True)
    args = [argv[0], *argv[2:]]
    if not any(not a.startswith("-") for a in argv[2:]):
        args.append(str(corpus))
    atheris.Setup(args, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
