"""The S2 Pro dual AR served by SGLang on a GPU: the production backend (``--backend sglang``).

    from engine.sglang import SGLangConfig, SGLangSynthesizer
    synth = SGLangSynthesizer(SGLangConfig(model="/path/to/s2-pro"))
    await synth.start()          # BackendUnavailable (an EngineError) names what is missing: GPU, sglang

Modules: ``guard`` (can it run here), ``keys`` (radix keys covering all 10 codes of a frame), ``convert`` (requests
and frames between Shoal and SGLang), ``sampling`` (per-request sampling inside a CUDA graph), ``core`` (the batched
slow AR + fast AR step, plain torch), ``models`` (the SGLang model class; imported only by SGLang), ``checkpoint``
(the directory SGLang loads), ``synthesizer`` (the engine), ``presets`` and ``bench`` (random weights, benchmark).
Install with ``pip install '.[sglang]'``; nothing here imports ``sglang`` until the engine starts.
"""

from engine.sglang.guard import SGLANG_VERSION, BackendUnavailable, missing_requirements, require_sglang_backend
from engine.sglang.synthesizer import SGLangConfig, SGLangSynthesizer

__all__ = [
    "SGLANG_VERSION",
    "BackendUnavailable",
    "SGLangConfig",
    "SGLangSynthesizer",
    "missing_requirements",
    "require_sglang_backend",
]
