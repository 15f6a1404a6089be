#!/usr/bin/env bash
# The GPU check of the SGLang backend, in one go, on a machine with an NVIDIA GPU (the targets are for an H200):
#   1. a virtual environment with the `sglang` extra (.venv-gpu; WHEELHOUSE=DIR installs offline from DIR;
#      SKIP_INSTALL=1 uses the environment as it is),
#   2. the GPU-marked tests: the shared engine contract and the SGLang-specific checks (tests/engine/sglang),
#   3. the benchmark on the s2pro preset (random weights, real shapes, bfloat16) with the targets beside the numbers.
# About 10 minutes on an H200 with the packages at hand. Logs and bench.json go to artifacts/gpu-check/.
#   scripts/gpu-check.sh [--quick]     --quick: fewer frames and sessions (a smoke run, not the numbers to report)
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
case "${1:-}" in "") ;; --quick) quick=1 ;; *) echo "usage: scripts/gpu-check.sh [--quick]" >&2; exit 2 ;; esac

out=artifacts/gpu-check
mkdir -p "$out"
if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi failed); the SGLang backend needs one" >&2
  exit 1
fi

venv=${GPU_VENV:-.venv-gpu}
if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
  started=$SECONDS
  [[ -x $venv/bin/python ]] || "${PYTHON:-python3}" -m venv "$venv"
  pip_args=(-q)
  [[ -n ${WHEELHOUSE:-} ]] && pip_args+=(--no-index --find-links "$WHEELHOUSE")
  "$venv/bin/python" -m pip install "${pip_args[@]}" -e '.[sglang]' 'pytest>=8' 'pytest-asyncio>=0.24'
  echo "gpu-check: installed in $((SECONDS - started)) s"
fi
py=$venv/bin/python
[[ -x $py ]] || py=${PYTHON:-python3}
# one line naming what is missing (GPU, sglang, its version), or nothing
"$py" -c 'from engine.sglang import require_sglang_backend; require_sglang_backend()'
"$py" -c 'import sglang, torch; print("gpu-check: sglang", sglang.__version__, "torch", torch.__version__)'

status=0
echo "== GPU tests"
timeout 360 "$py" -m pytest -m gpu tests/engine/sglang -q -rs -p no:cacheprovider 2>&1 | tee "$out/tests.log" \
  || status=1

echo "== benchmark: s2pro preset, random weights, bfloat16"
if ((quick)); then
  bench_args=(--concurrency 1,8 --frames 64 --sessions 4 --turns 5 --turn-frames 24)
else
  bench_args=(--concurrency 1,8,32 --frames 256 --sessions 16 --turns 5 --turn-frames 48)
fi
timeout 420 "$py" -m engine.sglang.bench --preset s2pro "${bench_args[@]}" --json "$out/bench.json" 2>&1 \
  | tee "$out/bench.log" || status=1

exit $status
