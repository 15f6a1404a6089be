"""Import stubs for the two packages SGLang's import chain needs that cannot be installed for the CPU API check.

Used only by ``tests/engine/sglang/test_sglang_api.py`` and only when ``scripts/sglang-api-check.sh`` asks for it
(``SHOAL_SGLANG_STUBS=1``); every other SGLang dependency on that chain is the real package, pinned, in the check's
own folder, and SGLang itself is the real ``sglang==0.5.23`` wheel. A stub only lets ``import X`` (and module-level
``@X.jit`` / ``X.Name`` attribute use) succeed; nothing in it runs, and a test that reached into it would fail.

- ``triton``: the Linux wheel is large (hundreds of MB) and useless without a GPU. The stub is SGLang's own: the
  block of ``sglang/_platform_stubs.py::install_platform_stubs`` that SGLang runs on Apple Silicon, where triton
  does not exist, read from the installed wheel and run as is (SGLang gates the function on macOS/MPS).
- ``torchvision``: PyPI's Linux wheel is built against CUDA torch (its ``_C.so`` needs ``libc10_cuda.so``) and
  fails to import beside the project's CPU torch; the CPU build is not on PyPI. SGLang needs it only for
  ``sglang.srt.multimodal.internvl_utils``'s module-level ``import torchvision.transforms``. transformers probes
  for torchvision with ``find_spec``; its cached answer is taken (False) before the stub goes in, so transformers
  keeps its no-torchvision path instead of importing the stub.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

_PLATFORM_STUBS = "_shoal_sglang_platform_stubs"  # SGLang's sglang/_platform_stubs.py, loaded without sglang/__init__


def _sglang_platform_stubs() -> ModuleType:
    loaded = sys.modules.get(_PLATFORM_STUBS)
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("sglang")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "_platform_stubs.py"
    file_spec = importlib.util.spec_from_file_location(_PLATFORM_STUBS, path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[_PLATFORM_STUBS] = module  # its dataclasses look their module up
    file_spec.loader.exec_module(module)
    return module


def _install_triton_stub(stubs: ModuleType) -> None:
    path = Path(stubs.__file__ or "")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    install = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "install_platform_stubs")
    test = "'triton' not in sys.modules"
    block = [n for n in ast.walk(install) if isinstance(n, ast.If) and test in ast.unparse(n.test)]
    assert len(block) == 1, "SGLang's triton stub block in _platform_stubs.install_platform_stubs is gone"
    exec(compile(ast.Module(body=block, type_ignores=[]), str(path), "exec"), vars(stubs))  # noqa: S102
    assert "triton" in sys.modules


class _StubLoader(importlib.abc.Loader):
    def __init__(self, stubs: ModuleType) -> None:
        self._stubs = stubs

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._stubs._MockModule(spec.name)  # any attribute is a placeholder, calls are pass-through

    def exec_module(self, module: ModuleType) -> None:
        return None


class _StubFinder(importlib.abc.MetaPathFinder):
    def __init__(self, stubs: ModuleType, names: set[str]) -> None:
        self._loader = _StubLoader(stubs)
        self._names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] not in self._names:
            return None
        return importlib.util.spec_from_loader(fullname, self._loader, is_package=True)


def install() -> list[str]:
    """Stub what of triton / torchvision is not importable for real; returns the stubbed names (once per process)."""
    stubbed: list[str] = []
    stubs = _sglang_platform_stubs()
    if "triton" not in sys.modules and importlib.util.find_spec("triton") is None:
        _install_triton_stub(stubs)
        stubbed.append("triton")
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        from transformers.utils import import_utils

        assert import_utils.is_torchvision_available() is False  # cached now: transformers keeps its own path
        sys.meta_path.append(_StubFinder(stubs, {"torchvision"}))
        stubbed.append("torchvision")
    return stubbed
