"""The Fish Audio S2 Pro dual-AR engine in PyTorch: config, model, checkpoint loader, prompt, sampling, generation.

    path = resolve_model_path("fishaudio/s2-pro")            # or a local checkpoint directory
    model = load_model(path, device="cuda", dtype="bfloat16")
    prompts = PromptBuilder.from_pretrained(path, model.config)
    for codes in stream(model, prompts.build_request(request), request.sampling, cancel=event):
        ...                                                    # (10,) codes per frame, as made

Import the submodules directly for the rest (``engine.dualar.model`` etc.). The codec lives in ``codec``.
"""

from engine.dualar.config import ModelConfig, load_config
from engine.dualar.generate import stream
from engine.dualar.loader import ModelLoadError, load_model, resolve_model_path
from engine.dualar.model import DualAR
from engine.dualar.prompt import PromptBuilder

__all__ = [
    "DualAR",
    "ModelConfig",
    "ModelLoadError",
    "PromptBuilder",
    "load_config",
    "load_model",
    "resolve_model_path",
    "stream",
]
