"""The shared engine contract on CUDA: the torch S2 Pro backend (tiny fixture checkpoint) on the GPU, bfloat16.

Marked ``gpu``; skipped without a CUDA GPU. ``scripts/gpu-check.sh`` runs it where pytest-asyncio is importable.
"""

from __future__ import annotations

import pytest
import torch

from engine.dualar.synthesizer import DualARConfig, DualARSynthesizer
from tests.engine.dualar import FIXTURES, MODEL_DIR
from tests.engine.test_contract import (
    test_cancelling_the_consumer_task_releases_the_engine,
    test_closing_mid_stream_releases_the_engine,
    test_concurrent_requests_all_complete,
    test_markup_and_voices_are_accepted,
    test_max_frames_caps_the_audio,
    test_nothing_to_say_yields_no_chunks,
)

__all__ = [
    "test_cancelling_the_consumer_task_releases_the_engine",
    "test_closing_mid_stream_releases_the_engine",
    "test_concurrent_requests_all_complete",
    "test_markup_and_voices_are_accepted",
    "test_max_frames_caps_the_audio",
    "test_nothing_to_say_yields_no_chunks",
]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
async def engine():
    synth = DualARSynthesizer(DualARConfig(model=str(MODEL_DIR), codec=str(FIXTURES / "codec" / "codec.pth"),
                                           device="cuda", dtype="bfloat16", progress=False))
    await synth.start()
    yield synth
    await synth.aclose()
