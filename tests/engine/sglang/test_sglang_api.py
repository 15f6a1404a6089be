"""Against the real ``sglang==0.5.23`` wheel, installed with ``--no-deps`` beside the project (never in the main
environment): ``scripts/sglang-api-check.sh`` installs it, and the light packages its import chain needs (pinned,
``--no-deps`` too), into the check's own folder and runs this module with that folder on ``PYTHONPATH``. Without
sglang every test here skips.

Two layers. The sources: every SGLang name and behaviour Shoal relies on (its model hooks, the watchdog and signal
set-up ``engine.sglang.process`` undoes, the registry's import path, the custom-processor fields), read from the
installed files with ``ast`` — no import, so drift shows even where SGLang's own dependencies are absent. The live
objects: SGLang imported for real, Shoal's model class taken out of SGLang's registry the way production registers
it (``SGLANG_EXTERNAL_MODEL_PACKAGE`` + ``EntryClass``), and the signatures, fields and calling conventions Shoal
relies on checked on the imported classes. Where SGLang's modules do not import, the live tests skip naming the
missing module. ``triton`` and ``torchvision`` are import stubs in the check (``sglang_stubs``, which says why);
everything Shoal touches is SGLang's own code.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from engine.sglang.guard import SGLANG_VERSION
from engine.sglang.checkpoint import ARCHITECTURE, MODEL_PACKAGE

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


# --- the live objects ---------------------------------------------------------------------------------------------

_LIVE_MODULES = {
    "model_runner": "sglang.srt.model_executor.model_runner",
    "forward_batch_info": "sglang.srt.model_executor.forward_batch_info",
    "radix_attention": "sglang.srt.layers.radix_attention",
    "logits_processor": "sglang.srt.layers.logits_processor",
    "sampling_batch_info": "sglang.srt.sampling.sampling_batch_info",
    "custom_logit_processor": "sglang.srt.sampling.custom_logit_processor",
    "hook_registry": "sglang.srt.plugins.hook_registry",
    "server_args": "sglang.srt.server_args",
    "engine": "sglang.srt.entrypoints.engine",
    "tokenizer_manager": "sglang.srt.managers.tokenizer_manager",
    "watchdog": "sglang.srt.utils.watchdog",
}


@pytest.fixture(scope="module")
def live() -> Any:
    """SGLang's modules, imported for real; the registry first, with the package named as production does."""
    before = os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE")
    os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = MODEL_PACKAGE
    try:
        if os.environ.get("SHOAL_SGLANG_STUBS") == "1":  # set by scripts/sglang-api-check.sh only
            from tests.engine.sglang import sglang_stubs

            sglang_stubs.install()
        fresh = "sglang.srt.models.registry" not in sys.modules
        modules = {"registry": "sglang.srt.models.registry", **_LIVE_MODULES}
        loaded: dict[str, Any] = {}
        for key, name in modules.items():
            try:
                loaded[key] = importlib.import_module(name)
            except ImportError as exc:  # SGLang's own dependencies, absent with --no-deps
                pytest.skip(f"SGLang's modules do not import here: {name} ({type(exc).__name__}: {exc}); "
                            f"run scripts/sglang-api-check.sh")
        yield SimpleNamespace(fresh=fresh, **loaded)
    finally:
        if before is None:
            os.environ.pop("SGLANG_EXTERNAL_MODEL_PACKAGE", None)
        else:
            os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = before


def _model_module() -> Any:
    return importlib.import_module(f"{MODEL_PACKAGE}.shoal_s2pro")


def test_shoal_s_model_class_comes_out_of_sglang_s_registry(live: Any) -> None:
    registry = live.registry.ModelRegistry
    model_class = _model_module().EntryClass
    if live.fresh:  # the registry read SGLANG_EXTERNAL_MODEL_PACKAGE at import: nothing else put the class there
        assert registry.models.get(ARCHITECTURE) is model_class, (
            f"SGLang's registry skipped {MODEL_PACKAGE}: {sorted(registry.models)}")
        assert not registry._default_models_loaded  # the external package alone, SGLang's own models deferred
    assert registry.resolve_model_cls([ARCHITECTURE]) == (model_class, ARCHITECTURE)  # ModelRunner's lookup
    assert live.registry.import_model_classes(MODEL_PACKAGE, strict=True) == {ARCHITECTURE: model_class}

    from engine.sglang.synthesizer import register_model_package

    assert register_model_package() is model_class
    assert registry.models[ARCHITECTURE] is model_class and model_class.__name__ == ARCHITECTURE
    for name in ("prepare_for_forward", "forward", "load_weights", "post_load_weights", "shoal_attach_frames"):
        assert callable(getattr(model_class, name))


def test_sglang_calls_the_model_the_way_shoal_s_class_takes_it(live: Any) -> None:
    model_class = _model_module().EntryClass
    # model_loader.loader._initialize_model: model_class(config=hf_config, quant_config=quant_config)
    inspect.signature(model_class.__init__).bind(None, config=object(), quant_config=None)
    # the runners: model.forward(forward_batch.input_ids, forward_batch.positions, forward_batch, **kwargs)
    inspect.signature(model_class.forward).bind(None, object(), object(), object(), pp_proxy_tensors=None)
    inspect.signature(model_class.load_weights).bind(None, iter(()))
    inspect.signature(model_class.prepare_for_forward).bind(None, object())
    runner = live.model_runner.ModelRunner
    assert "prepare_for_forward" in inspect.getsource(runner._forward_raw)
    assert list(inspect.signature(runner.sample).parameters) == ["self", "logits_output", "forward_batch"]
    assert issubclass(model_class, torch.nn.Module)


def test_radix_attention_takes_shoal_s_arguments(live: Any) -> None:
    attention = live.radix_attention.RadixAttention
    # engine.sglang.models.shoal_s2pro: RadixAttention(n_head, head_dim, scaling, num_kv_heads=, layer_id=, prefix=)
    inspect.signature(attention.__init__).bind(None, 8, 64, 0.125, num_kv_heads=2, layer_id=3, prefix="p")
    layer = attention(8, 64, 64**-0.5, num_kv_heads=2, layer_id=3, prefix="slow.layers.3.attention.attend")
    assert (layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim, layer.layer_id) == (8, 2, 64, 3)
    # engine.sglang.core.SlowAttention: attend(q, k, v, forward_batch)
    assert list(inspect.signature(attention.forward).parameters)[:5] == ["self", "q", "k", "v", "forward_batch"]


def test_forward_batch_and_outputs_have_the_fields_shoal_reads(live: Any) -> None:
    info = live.forward_batch_info
    fields = {f.name for f in dataclasses.fields(info.ForwardBatch)}
    read = {"forward_mode", "batch_size", "input_ids", "positions", "req_pool_indices", "extend_prefix_lens_cpu",
            "extend_seq_lens", "extend_seq_lens_cpu", "sampling_info", "rids"}
    assert read <= fields, sorted(read - fields)
    assert hasattr(info.ForwardBatch, "req_pool_indices_cpu") or "req_pool_indices_cpu" in fields
    mode = info.ForwardMode
    assert mode.DECODE.is_decode() and not mode.EXTEND.is_decode() and mode.IDLE.is_idle()

    output = live.logits_processor.LogitsProcessorOutput(next_token_logits=torch.zeros((2, 5)))
    assert output.customized_info is None  # Shoal adds its frame rows to what is there
    output.customized_info = {"k": [1, 2]}

    sampling = {f.name for f in dataclasses.fields(live.sampling_batch_info.SamplingBatchInfo)}
    assert {"has_custom_logit_processor", "custom_logit_processor", "custom_params"} <= sampling


def test_shoal_s_passthrough_processor_round_trips_through_sglang(live: Any) -> None:
    model_class = _model_module().EntryClass
    base = live.custom_logit_processor.CustomLogitProcessor
    assert issubclass(model_class.passthrough, base)
    processor = base.from_str(model_class.passthrough.to_str())  # what each request carries, as SGLang reads it
    assert isinstance(processor, model_class.passthrough)
    logits = torch.randn(2, 7)
    assert processor(logits, [{"plan": 1}, {"plan": 2}]) is logits


class _Runner:  # a stand-in target for SGLang's HookRegistry: same method shape as ModelRunner.sample
    def __init__(self, model: Any) -> None:
        self.model = model

    def sample(self, logits_output: Any, forward_batch: Any) -> str:
        return "ids"


def test_shoal_s_sample_hook_is_applied_and_called_as_shoal_expects(live: Any) -> None:
    module = _model_module()
    registry, hook_type = live.hook_registry.HookRegistry, live.hook_registry.HookType
    module.install_sample_hook()
    target = "sglang.srt.model_executor.model_runner.ModelRunner.sample"
    assert target in registry._patched
    assert (hook_type.AFTER, module._after_sample) in [(t, h) for t, h, _ in registry._hooks[target]]
    module.install_sample_hook()  # once per process
    assert sum(h is module._after_sample for _, h, _ in registry._hooks[target]) == 1

    # SGLang's AFTER convention, on a stand-in with ModelRunner.sample's shape: hook(result, self, *args)
    calls: list[tuple[Any, Any]] = []
    stand_in = f"{__name__}._Runner.sample"
    original = _Runner.sample
    try:
        registry.register(stand_in, module._after_sample, hook_type.AFTER)
        registry.apply_hooks()
        model = SimpleNamespace(shoal_attach_frames=lambda lo, fb: calls.append((lo, fb)))
        assert _Runner(model).sample("logits", "batch") == "ids"  # SGLang's sampled ids kept
        assert _Runner(model).sample(logits_output="lo", forward_batch="fb") == "ids"
    finally:
        _Runner.sample = original  # type: ignore[method-assign]
        registry._hooks.pop(stand_in, None)
        registry._patched.discard(stand_in)
    assert calls == [("logits", "batch"), ("lo", "fb")]


def test_the_engine_arguments_are_server_args_fields(live: Any, tmp_path: Path) -> None:
    from engine.sglang.checkpoint import write_shadow_checkpoint
    from engine.sglang.presets import preset_raw_config
    from engine.sglang.synthesizer import SGLangConfig, engine_kwargs

    config = SGLangConfig(preset="tiny")
    shadow = write_shadow_checkpoint(tmp_path / "ckpt", preset_raw_config("tiny"), source=None,
                                     context_length=config.max_seq_len, max_rows=config.max_rows,
                                     max_slots=config.max_slots)
    kwargs = engine_kwargs(config, shadow)
    fields = set(live.server_args.ServerArgs.__struct_fields__)  # a msgspec struct in 0.5.23
    assert set(kwargs) <= fields, sorted(set(kwargs) - fields)
    args = live.server_args.ServerArgs(**kwargs)  # what sglang.Engine(**kwargs) builds first (unresolved)
    assert {name: getattr(args, name) for name in kwargs} == kwargs


def test_the_engine_and_process_hooks_shoal_uses_are_live(live: Any) -> None:
    engine = live.engine.Engine
    assert {"input_ids", "sampling_params", "stream", "rid", "custom_logit_processor"} <= set(
        inspect.signature(engine.async_generate).parameters)
    assert inspect.isasyncgenfunction(engine.async_generate) or inspect.iscoroutinefunction(engine.async_generate)
    assert callable(engine.shutdown) and callable(engine.get_all_child_pids)
    manager = live.tokenizer_manager.TokenizerManager
    inspect.signature(manager.abort_request).bind(None, "rid")
    assert "add_signal_handler(signal.SIGTERM" in inspect.getsource(manager.auto_create_handle_loop)
    watchdog = live.watchdog.SubprocessWatchdog
    assert callable(watchdog.start) and callable(watchdog.stop)
