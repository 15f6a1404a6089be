"""Can the SGLang backend run here? Checked lazily, at start, with a message that names everything missing.

Nothing in ``engine.sglang`` imports ``sglang`` at module level except the model package SGLang itself loads
(``engine.sglang.models``), so importing the backend, building its config and running the CPU tests never need it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from engine.base import EngineError

__all__ = ["SGLANG_VERSION", "BackendUnavailable", "missing_requirements", "require_sglang_backend"]

SGLANG_VERSION = "0.5.23"  # the version pinned by the `sglang` extra in pyproject.toml (the model uses its internals)
INSTALL_HINT = "pip install '.[sglang]'"


class BackendUnavailable(EngineError):
    """The SGLang backend cannot start on this machine; the message says why and what to do."""


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch comes with the model extra
        return False
    return bool(torch.cuda.is_available())


def _sglang_version() -> str | None:
    if importlib.util.find_spec("sglang") is None:
        return None
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:  # importable from a source tree, no metadata
        return "unknown"


def missing_requirements(*, cuda: bool | None = None, sglang_version: str | None | bool = False) -> list[str]:
    """What keeps the backend from running, one phrase each; empty when it can run.

    ``cuda`` and ``sglang_version`` override the probes (tests); ``sglang_version=None`` means not installed.
    """
    has_cuda = _cuda_available() if cuda is None else cuda
    version = _sglang_version() if sglang_version is False else sglang_version
    missing = []
    if not has_cuda:
        missing.append("no CUDA GPU (torch.cuda.is_available() is false; the SGLang backend runs on NVIDIA GPUs only)")
    if version is None:
        missing.append(f"sglang is not installed ({INSTALL_HINT})")
    elif version not in (SGLANG_VERSION, "unknown"):
        missing.append(f"sglang {version} is installed but this backend is built for sglang=={SGLANG_VERSION} "
                       f"({INSTALL_HINT})")
    return missing


def require_sglang_backend(**probes: object) -> None:
    """Raise :class:`BackendUnavailable` (an EngineError) naming everything missing, or return."""
    missing = missing_requirements(**probes)  # type: ignore[arg-type]
    if missing:
        raise BackendUnavailable("the sglang backend cannot start: " + "; ".join(missing))
