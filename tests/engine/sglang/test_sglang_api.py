"""Against the real ``sglang==0.5.23`` wheel, installed without its dependencies beside the project (never in the
main environment): ``scripts/sglang-api-check.sh`` installs it into a target folder and runs this module with that
folder on ``PYTHONPATH``. Without sglang every test here skips.

Two layers. The sources: every SGLang name and behaviour Shoal relies on (its model hooks, the watchdog and signal
set-up ``engine.sglang.process`` undoes, the registry's import path, the custom-processor fields), read from the
installed files with ``ast`` — no import, so drift shows even where SGLang's own dependencies are absent. The import:
Shoal's model class through SGLang's registry, when SGLang's modules import here (else a skip naming what is
missing).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
from pathlib import Path

import pytest

from engine.sglang.guard import SGLANG_VERSION

_SPEC = importlib.util.find_spec("sglang")  # finds the package without running its __init__
pytestmark = pytest.mark.skipif(_SPEC is None, reason="sglang is not installed (scripts/sglang-api-check.sh)")


def source(module: str) -> ast.Module:
    assert _SPEC is not None and _SPEC.submodule_search_locations
    root = Path(next(iter(_SPEC.submodule_search_locations))).parent
    return ast.parse((root / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))


def cls(tree: ast.Module, name: str) -> ast.ClassDef:
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name]
    assert found, f"class {name} is gone"
    return found[0]


def methods(node: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def params(fn: ast.FunctionDef) -> list[str]:
    return [a.arg for a in [*fn.args.args, *fn.args.kwonlyargs]]


def test_the_installed_version_is_the_pinned_one() -> None:
    import importlib.metadata

    assert importlib.metadata.version("sglang") == SGLANG_VERSION


def test_the_watchdog_and_signal_setup_that_shoal_undoes_are_as_expected() -> None:
    watchdog = methods(cls(source("sglang.srt.utils.watchdog"), "SubprocessWatchdog"))
    assert {"start", "stop"} <= watchdog.keys()
    manager = source("sglang.srt.managers.tokenizer_manager")
    tm = methods(cls(manager, "TokenizerManager"))
    assert "auto_create_handle_loop" in tm and "abort_request" in tm
    text = ast.unparse(tm["auto_create_handle_loop"])
    assert "add_signal_handler(signal.SIGTERM" in text and "self.event_loop is not None" in text
    assert "_subprocess_watchdog" in ast.unparse(manager)
    engine = methods(cls(source("sglang.srt.entrypoints.engine"), "Engine"))
    assert {"get_all_child_pids", "shutdown", "async_generate"} <= engine.keys()
    assert {"input_ids", "sampling_params", "stream", "rid", "custom_logit_processor"} <= set(
        params(engine["async_generate"]))


def test_the_model_hooks_and_fields_shoal_uses_exist() -> None:
    runner = methods(cls(source("sglang.srt.model_executor.model_runner"), "ModelRunner"))
    assert "prepare_for_forward" in ast.unparse(runner["_forward_raw"])
    assert params(runner["sample"])[:3] == ["self", "logits_output", "forward_batch"]
    attention = methods(cls(source("sglang.srt.layers.radix_attention"), "RadixAttention"))
    assert params(attention["__init__"])[:6] == ["self", "num_heads", "head_dim", "scaling", "num_kv_heads",
                                                 "layer_id"]
    logits = ast.unparse(cls(source("sglang.srt.layers.logits_processor"), "LogitsProcessorOutput"))
    assert "next_token_logits" in logits and "customized_info" in logits
    sampling = ast.unparse(cls(source("sglang.srt.sampling.sampling_batch_info"), "SamplingBatchInfo"))
    for field in ("has_custom_logit_processor", "custom_logit_processor", "custom_params"):
        assert f"{field}:" in sampling, field
    hooks = methods(cls(source("sglang.srt.plugins.hook_registry"), "HookRegistry"))
    assert {"register", "apply_hooks"} <= hooks.keys()
    registry = ast.unparse(source("sglang.srt.models.registry"))
    assert "SGLANG_EXTERNAL_MODEL_PACKAGE" in registry and "def import_model_classes" in registry


def test_shoal_s_model_class_comes_out_of_sglang_s_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environ, "SGLANG_EXTERNAL_MODEL_PACKAGE", "engine.sglang.models")
    try:
        registry = importlib.import_module("sglang.srt.models.registry")
    except ImportError as exc:  # SGLang's own dependencies, absent with --no-deps
        pytest.skip(f"SGLang's modules do not import here ({type(exc).__name__}: {exc})")
    from engine.sglang.checkpoint import ARCHITECTURE
    from engine.sglang.synthesizer import register_model_package

    model_class = register_model_package()
    assert registry.ModelRegistry.models[ARCHITECTURE] is model_class
    assert model_class.__name__ == ARCHITECTURE
    for name in ("prepare_for_forward", "forward", "load_weights", "post_load_weights", "shoal_attach_frames"):
        assert callable(getattr(model_class, name))
