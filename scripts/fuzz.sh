#!/usr/bin/env bash
# Long coverage-guided fuzzing of the protocol decoder and the turn machine (atheris: pip install '.[fuzz]').
#
#   scripts/fuzz.sh [SECONDS per target, default 600] [TARGET...]     e.g. scripts/fuzz.sh 3600 protocol
#
# Runs from the committed corpus (tests/fuzz/corpus/TARGET) and adds to it what raises coverage; commit the new
# files so CI (tests/fuzz/test_corpus.py) replays them. A crash leaves crash-* under fuzz-out/: the input that
# broke it. Fix the bug, move the file into the corpus, commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
shift || true
targets=("${@:-protocol turns}")
mkdir -p fuzz-out
for target in ${targets[@]}; do
  echo "fuzzing $target for $seconds s"
  python -m tests.fuzz.fuzz "$target" -max_total_time="$seconds" -max_len=4096 -artifact_prefix=fuzz-out/ \
    -print_final_stats=1 "tests/fuzz/corpus/$target"
done
