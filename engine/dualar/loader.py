"""Load an S2 Pro checkpoint directory into a :class:`DualAR`.

A checkpoint is a Hugging Face style directory: ``config.json`` plus weights as sharded safetensors
(``model.safetensors.index.json``), a single ``model.safetensors``, or a ``model.pth`` state dict, with the
published key names (``text_model.model.*`` for the slow AR, ``audio_decoder.*`` for the fast AR and the codebook
embeddings). Every key and shape is checked before a tensor is copied; a wrong or partial checkpoint is one
:class:`ModelLoadError` that lists the missing keys, the unexpected keys and the shape mismatches.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.dualar.config import ModelConfig, load_config
from engine.dualar.model import DualAR

__all__ = [
    "ModelLoadError",
    "load_model",
    "load_state_dict",
    "published_name",
    "resolve_model_path",
    "to_published",
]

_SLOW, _FAST = "text_model.model.", "audio_decoder."
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SHOW = 12  # keys listed per kind of problem


class ModelLoadError(ValueError):
    """The checkpoint cannot be found, read, or does not fit the model its config.json describes."""


def published_name(name: str) -> str:
    """Our parameter name -> the checkpoint's (``slow.layers.0.…`` -> ``text_model.model.layers.0.…``)."""
    if name == "slow.codebook_embeddings.weight":
        return _FAST + "codebook_embeddings.weight"  # used by the slow AR, stored with the fast AR
    if name.startswith("slow."):
        return _SLOW + name.removeprefix("slow.")
    if name.startswith("fast."):
        return _FAST + name.removeprefix("fast.")
    raise ValueError(f"not a DualAR parameter: {name!r}")


def to_published(model: DualAR) -> dict[str, torch.Tensor]:
    """The model's weights under the published names (what :func:`load_model` reads)."""
    return {published_name(name): tensor for name, tensor in model.state_dict().items()}


def resolve_model_path(
    spec: str | Path, *, revision: str | None = None, local_files_only: bool = False, cache_dir: str | None = None
) -> Path:
    """A checkpoint directory: ``spec`` itself if it is a directory, else a Hugging Face repo id to download.

    Downloading needs the network (or ``local_files_only`` with the repo already in the cache); a gated, missing
    or unreachable repo is a ModelLoadError that says so.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    text = str(spec)
    parts = text.split("/")
    if path.exists() or text.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts):
        raise ModelLoadError(f"{text!r} is neither a model directory nor a Hugging Face repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a dependency of the engine
        raise ModelLoadError(f"{text!r} is not a local directory and huggingface_hub is not installed") from exc
    try:
        local = snapshot_download(
            repo_id=text, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir
        )
    except Exception as exc:  # every hub failure (offline, gated, not found) becomes one documented error
        raise ModelLoadError(
            f"cannot download {text!r} from Hugging Face ({type(exc).__name__}: {exc}). Check the repo id, accept "
            "its license and log in (`hf auth login`) for gated repos, or pass a local directory."
        ) from exc
    return Path(local)


@contextmanager
def _open_tensors(path: Path) -> Iterator[tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]]:
    """The checkpoint's key -> shape map, and a function that reads one tensor (lazily where the format allows)."""
    index, single, pth = path / "model.safetensors.index.json", path / "model.safetensors", path / "model.pth"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a safetensors index with a weight_map: {exc}") from exc
        files = sorted(set(weight_map.values()))
        missing_files = [name for name in files if not (path / name).is_file()]
        if missing_files:
            raise ModelLoadError(f"{index.name} names shard(s) missing from {path}: {', '.join(missing_files)}")
        with _safetensors([path / name for name in files]) as opened:
            yield opened
    elif single.is_file():
        with _safetensors([single]) as opened:
            yield opened
    elif pth.is_file():
        try:
            state = torch.load(pth, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"cannot read {pth}: {exc}") from exc
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelLoadError(f"{pth} is not a state dict of tensors")
        yield {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__
    else:
        raise ModelLoadError(
            f"no weights in {path}: expected model.safetensors.index.json, model.safetensors or model.pth"
        )


@contextmanager
def _safetensors(files: list[Path]) -> Iterator[tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]]:
    handles, where, shapes = [], {}, {}
    try:
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:
                raise ModelLoadError(f"cannot read {file}: {exc}") from exc
            handles.append(handle)
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                where[key] = handle
                shapes[key] = tuple(handle.get_slice(key).get_shape())
        yield shapes, lambda key: where[key].get_tensor(key)
    finally:
        handles.clear()


def _listing(kind: str, items: list[str]) -> str:
    more = f" … and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"{kind} ({len(items)}): {', '.join(items[:_SHOW])}{more}"


def _check(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], path: Path) -> None:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    mismatched = sorted(
        f"{key} {list(found[key])} != expected {list(shape)}"
        for key, shape in expected.items()
        if key in found and tuple(found[key]) != tuple(shape)
    )
    problems = [
        _listing(kind, items)
        for kind, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        raise ModelLoadError(f"checkpoint {path} does not fit its config.json:\n  " + "\n  ".join(problems))


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """float32 / bfloat16, by name or as a torch dtype; anything else is a ValueError."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return dtype


def resolve_device(device: torch.device | str) -> torch.device:
    """cpu or cuda[:N], and CUDA only where it is available; anything else is a ValueError."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but CUDA is not available on this machine")
    return device


def load_state_dict(path: str | Path, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory under its published name, on the CPU, unchecked."""
    path = Path(path)
    with _open_tensors(path) as (shapes, read):
        return {key: read(key) for key in tqdm(shapes, desc="Loading tensors", file=sys.stderr, disable=not progress)}


def load_model(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.bfloat16,
    progress: bool = True,
    config: ModelConfig | None = None,
) -> DualAR:
    """Build the model ``config.json`` describes and fill it from the checkpoint's weights, in eval mode.

    ``progress`` shows a tqdm bar on stderr while tensors are copied. Raises ModelLoadError for a missing or wrong
    checkpoint (including a bad config.json) and ValueError for a bad device or dtype.
    """
    path, device, dtype = Path(path), resolve_device(device), resolve_dtype(dtype)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    if config is None:
        try:
            config = load_config(path)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
    with torch.device("meta"):
        model = DualAR(config).to(dtype)  # no memory until to_empty, and then once, in the final dtype
    expected = {published_name(name): tuple(t.shape) for name, t in model.state_dict().items()}
    with _open_tensors(path) as (shapes, read):
        _check(expected, shapes, path)
        model = model.to_empty(device=device)
        params = model.state_dict()
        with torch.no_grad():
            for name in tqdm(params, desc="Loading weights", file=sys.stderr, disable=not progress, unit="tensor"):
                params[name].copy_(read(published_name(name)))
    model.init_buffers()
    return model.requires_grad_(False).eval()
