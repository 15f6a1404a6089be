#!/usr/bin/env bash
# The GPU check, for the lent GPU machine as it is: the image's python3 (3.12), torch 2.11 + CUDA 13, triton,
# no network, nothing installed; only this repository travels (and, optionally, wheels in .whl/, see below).
#   scripts/gpu-check.sh              on the GPU: a 30 s preflight, then ONE process (python3 -m engine.gpucheck)
#                                     running graphs==eager, the GPU-marked tests and the benchmark (s2pro preset,
#                                     random weights, bfloat16); a few minutes, well under the 10-minute call limit
#   scripts/gpu-check.sh --dry-run    the same code path on the CPU: tiny preset, float32 (proves it completes)
# Everything is written under $OUT (the folder that comes back from the lent machine), or a temporary folder when
# OUT is unset: preflight.txt, gpu-check.log, gpu-check.json, gpu-check.txt, gpu-check.png, tests.log.
# Optional wheels: if .whl/*.whl exists (e.g. pytest-asyncio, for the async contract suite on CUDA), they are
# unpacked offline into /tmp/gpu-check-site first (pip --no-index --no-deps --target); nothing is downloaded.
# Where sglang is importable (a machine that has it), the SGLang backend's numbers are added by the same process.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
case "${1:-}" in "") ;; --dry-run) dry=1 ;; *) echo "usage: scripts/gpu-check.sh [--dry-run]" >&2; exit 2 ;; esac

out=${OUT:-}
[[ -n $out ]] || out=$(mktemp -d "${TMPDIR:-/tmp}/shoal-gpu-check.XXXXXX")
mkdir -p "$out"
py=${PYTHON:-python3}
[[ $dry == 1 && -z ${PYTHON:-} && -x .venv/bin/python ]] && py=.venv/bin/python  # here: the project's venv
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
echo "gpu-check: report folder $out"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-check-site .whl/*.whl \
    && export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH} \
    && echo "gpu-check: carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
fi

# preflight (30 s at most): the GPU, torch and its CUDA, one matrix product; stops here if the machine is not fit
{
  echo "date: $(date -u +%FT%TZ)"
  if ((dry == 0)); then
    timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: failed"
  fi
  timeout 25 "$py" - "$dry" <<'PY'
import platform, sys, time
import torch
dry = sys.argv[1] == "1"
print(f"python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda} "
      f"available {torch.cuda.is_available()}")
if not dry:
    assert torch.cuda.is_available(), "torch sees no CUDA GPU"
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize(); t = time.perf_counter(); y = x @ x; torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name(0)}: 4096^3 bf16 matmul {1000 * (time.perf_counter() - t):.2f} ms "
          f"(first call); finite {bool(torch.isfinite(y).all())}")
for name in ("triton", "pytest", "pytest_asyncio", "matplotlib", "sglang"):
    try:
        module = __import__(name)
        print(f"{name}: {getattr(module, '__version__', 'present')}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__})")
PY
} 2>&1 | tee "$out/preflight.txt"
if grep -q -E "^(Traceback|AssertionError)|torch sees no CUDA" "$out/preflight.txt"; then
  echo "gpu-check: preflight failed; see $out/preflight.txt" >&2
  exit 1
fi

args=(--out "$out")
((dry)) && args+=(--dry-run)
# 10 + 25 + 450 + 15 s at most: inside the 10-minute call, the report written after every section
timeout -k 15 450 "$py" -m engine.gpucheck "${args[@]}" 2>&1 | tee "$out/gpu-check.log"
status=${PIPESTATUS[0]}
echo "gpu-check: exit $status; report: $out/gpu-check.txt, $out/gpu-check.json, $out/gpu-check.png"
exit "$status"
