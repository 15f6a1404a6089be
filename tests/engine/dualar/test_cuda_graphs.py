"""The CUDA-graph decode (``cuda_graphs``): on the CPU, the function the GPU captures, run eagerly — it reproduces the
reference greedy frames, streams are independent of their batch and its padding, bad input is refused. On a GPU
(marked ``gpu``): replayed graphs equal the eager step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.base import Sampling
from engine.dualar.cuda_graphs import BATCH_SIZES, GraphedDecoder, bucket
from engine.dualar.loader import load_model
from engine.dualar.presets import random_model
from tests.engine.dualar import MODEL_DIR, golden

GREEDY = Sampling(temperature=0.0, seed=0)


def test_a_batch_runs_in_the_smallest_captured_size_that_holds_it() -> None:
    assert [bucket(n, BATCH_SIZES) for n in (1, 2, 3, 5, 8, 9, 17, 32)] == [1, 2, 4, 8, 8, 16, 32, 32]
    with pytest.raises(ValueError, match="largest captured"):
        bucket(33, BATCH_SIZES)
    with pytest.raises(ValueError, match="at least one"):
        bucket(0, BATCH_SIZES)


def decode(decoder: GraphedDecoder, starts: list[tuple[torch.Tensor, Sampling]], frames: int) -> np.ndarray:
    """Streams started in rows 0..n-1, then ``frames - 1`` batched steps: (n, frames, 1 + C)."""
    first = [decoder.start(row, prompt, sampling) for row, (prompt, sampling) in enumerate(starts)]
    out = [torch.stack(first)]
    for _ in range(frames - 1):
        out.append(decoder.step(len(starts)).clone())
    for row in range(len(starts)):
        decoder.stop(row)
    return torch.stack(out, dim=1).numpy()


def test_the_captured_step_reproduces_the_reference_greedy_frames() -> None:
    model = load_model(MODEL_DIR, dtype="float32", progress=False)
    decoder = GraphedDecoder(model, max_batch=4, max_seq_len=512)
    assert not decoder.use_graphs  # no CUDA here: the same function, eagerly
    prompt = torch.from_numpy(golden("c")["prompt"])
    expected = golden("c")["generated"]  # (1 + C, frames) from the reference implementation
    frames = decode(decoder, [(prompt, GREEDY)], expected.shape[1])[0]
    np.testing.assert_array_equal(frames.T, expected)  # main token and 10 codes of each frame


def test_streams_do_not_depend_on_their_batch_or_its_padding() -> None:
    model = random_model("tiny", seed=1)
    gen = torch.Generator().manual_seed(0)
    c = model.config

    def prompt(length: int) -> torch.Tensor:
        p = torch.zeros(1 + c.num_codebooks, length, dtype=torch.long)
        p[0] = torch.randint(32, 127, (length,), generator=gen)
        return p

    starts = [(prompt(12), Sampling(temperature=0.8, top_p=0.9, seed=11)), (prompt(20), GREEDY),
              (prompt(7), Sampling(temperature=1.0, top_k=20, seed=5))]
    together = decode(GraphedDecoder(model, max_batch=8, max_seq_len=128), starts, 12)  # 3 rows in a batch of 4
    for i, start in enumerate(starts):
        alone = decode(GraphedDecoder(model, max_batch=8, max_seq_len=128), [start], 12)[0]
        np.testing.assert_array_equal(together[i], alone)
    assert len({together[i].tobytes() for i in range(3)}) == 3


def test_bad_rows_and_prompts_are_clear_errors() -> None:
    model = random_model("tiny")
    decoder = GraphedDecoder(model, max_batch=2, max_seq_len=64)
    good = torch.zeros(1 + model.config.num_codebooks, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="row 2"):
        decoder.start(2, good, GREEDY)
    with pytest.raises(ValueError, match="shape"):
        decoder.start(0, good[:3], GREEDY)
    with pytest.raises(ValueError, match="within"):
        decoder.start(0, torch.zeros(1 + model.config.num_codebooks, 63, dtype=torch.long), GREEDY)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedDecoder(model, max_batch=2, max_seq_len=64, use_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["tiny", "s2pro"])
def test_replayed_graphs_equal_the_eager_step_on_cuda(preset: str) -> None:
    from engine.gpucheck import check_graphs_equal_eager

    result = check_graphs_equal_eager(preset, device="cuda", dtype="bfloat16", frames=24, streams=(1, 3, 8))
    assert result["equal"], result
