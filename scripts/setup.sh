#!/usr/bin/env bash
# Set up Shoal on a fresh Linux machine: system libraries (apt), a virtual environment at .venv, the package.
#   scripts/setup.sh          what `shoal serve` needs
#   scripts/setup.sh --test   plus what the test suite needs
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-run}
case "$mode" in run|--test) ;; *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;; esac

apt_pkgs=()
ldconfig -p 2>/dev/null | grep -q 'libopus\.so\.0' || apt_pkgs+=(libopus0)
if [[ $mode == --test && ! -x /usr/bin/chromium ]]; then
  apt_pkgs+=(chromium)  # the browser tests drive Debian's Chromium, never a downloaded one
fi
if ((${#apt_pkgs[@]})); then
  if ! command -v apt-get >/dev/null; then
    echo "setup: please install ${apt_pkgs[*]} with your package manager" >&2; exit 1
  fi
  sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
  echo "setup: installing ${apt_pkgs[*]} with apt-get"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python >= 3.11 is required (found $("$python" --version 2>&1))" >&2; exit 1
fi
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [[ $mode == --test ]]; then
  # the tests run the S2 Pro engine on the CPU: pin the CPU build of torch (an unpinned torch pulls CUDA wheels)
  .venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q 'torch==2.13.0'
  .venv/bin/python -m pip install -q -e '.[model,test]'
else
  .venv/bin/python -m pip install -q -e .
fi
# the Silero VAD model files (realtime/vad.py runs them with onnxruntime): without the torch the wheel declares
.venv/bin/python -m pip install -q --no-deps 'silero-vad==6.2.3'
echo "setup: ready (.venv/bin/shoal)"
