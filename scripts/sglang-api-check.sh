#!/usr/bin/env bash
# Shoal's SGLang integration against the real sglang==0.5.23 wheel, on the CPU, without a GPU and without touching
# the project's environment. Into its own folder (never .venv) go the wheel with --no-deps (its GB of CUDA packages
# never install) and, pinned and --no-deps too, the light packages SGLang's import chain needs up to its model
# registry, model runner and engine (39 wheels, 31 MB; with sglang's 38 MB, 68 MB downloaded, ~430 MB on disk).
# tests/engine/sglang/test_sglang_api.py then runs with the project's interpreter (its CPU torch, numpy, ...) and
# that folder on PYTHONPATH: it checks SGLang's sources, imports Shoal's model class through SGLang's registry as
# production registers it, and checks the signatures and fields Shoal relies on on the live classes. triton and
# torchvision are import stubs there (SHOAL_SGLANG_STUBS=1; tests/engine/sglang/sglang_stubs.py says why).
#   scripts/sglang-api-check.sh            (SGLANG_TARGET=DIR for another folder; ~10 s warm, ~45 s cold)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${SGLANG_TARGET:-/tmp/shoal-sglang-0.5.23}
py=${PYTHON:-.venv/bin/python}
# What the import chain needs beyond the project's environment (torch, numpy, pillow, starlette, httpx, anyio,
# tokenizers, huggingface_hub, safetensors, psutil, packaging, pyyaml, ... come from .venv). Versions: sglang's own
# pins where it has them (transformers, openai, apache-tvm-ffi, compressed-tensors, sentencepiece), else current.
deps=(
  aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 annotated-doc==0.0.7 annotated-types==0.8.0
  apache-tvm-ffi==0.1.11 attrs==26.1.0 charset-normalizer==3.5.3 compressed-tensors==0.18.0 dill==0.4.1
  distro==1.9.0 einops==0.8.2 fastapi==0.165.0 frozenlist==1.8.0 gguf==0.19.0 ipython==9.19.1 loguru==0.7.3
  msgspec==0.23.0 multidict==7.2.1 openai==2.8.0 opentelemetry-api==1.45.3 orjson==3.13.0
  partial-json-parser==0.2.1.1.post7 propcache==0.5.4 pybase64==1.5.1 pydantic==2.14.4 pydantic-core==2.50.5
  pyzmq==27.3.0 regex==2026.12.2 requests==2.34.2 sentencepiece==0.2.1 setproctitle==1.3.8 sniffio==1.3.1
  traitlets==5.16.1 transformers==5.19.0 typing-inspection==0.4.5 urllib3==2.8.0 uvloop==0.23.0 yarl==1.25.1
)
wanted="sglang==0.5.23 ${deps[*]}"
if [[ ! -d $target/sglang || "$(cat "$target/.shoal-installed" 2>/dev/null)" != "$wanted" ]]; then
  # shellcheck disable=SC2086  # one word per requirement
  "$py" -m pip install -q --no-deps --upgrade --target "$target" $wanted 2>&1 | { grep -v "^WARNING: " || true; }
  printf '%s' "$wanted" > "$target/.shoal-installed"
fi
PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" SHOAL_SGLANG_STUBS=1 "$py" -m pytest \
  tests/engine/sglang/test_sglang_api.py -q -rs -p no:cacheprovider "$@"
