#!/usr/bin/env bash
# Shoal's SGLang integration against the real sglang==0.5.23 wheel, on the CPU, without a GPU and without touching
# the project's environment: the wheel goes into its own folder with --no-deps (its GB of CUDA dependencies never
# install), and tests/engine/sglang/test_sglang_api.py runs with that folder on PYTHONPATH. It checks, from the
# wheel's sources, every name and behaviour Shoal relies on (model hooks, ForwardBatch / LogitsProcessorOutput /
# SamplingBatchInfo fields, the watchdog and signal set-up Shoal undoes, the registry path), and imports Shoal's model
# class through SGLang's registry where SGLang's modules import (else that one test skips, naming what is missing).
#   scripts/sglang-api-check.sh            (SGLANG_TARGET=DIR to reuse a folder; about a minute, mostly the download)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${SGLANG_TARGET:-/tmp/shoal-sglang-0.5.23}
py=${PYTHON:-.venv/bin/python}
if [[ ! -d $target/sglang ]]; then
  "$py" -m pip install -q --no-deps --target "$target" 'sglang==0.5.23'
fi
PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$py" -m pytest tests/engine/sglang/test_sglang_api.py -q -rs \
  -p no:cacheprovider "$@"
