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
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi
echo "setup: ready (.venv/bin/shoal)"
