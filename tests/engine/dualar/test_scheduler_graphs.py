"""The scheduler's graphed decode path (``Scheduler`` + ``GraphedDecoder`` over its slots).

On the CPU the graphed path's function runs eagerly (a ``GraphedDecoder`` with ``use_graphs=False``): greedy codes
equal the eager scheduler's, seeded streams do not depend on what runs beside them, paused / prefilling / free slots
are padding rows, the prefix cache still feeds it, the CPU default is the eager step. On a GPU (marked ``gpu``): the
captured scheduler equals its own step run eagerly (bfloat16, every code), and gives the eager scheduler's greedy
codes (float32) over the fixture and over a random ``s2pro`` prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from engine.base import Sampling
from engine.dualar.cuda_graphs import GraphedDecoder
from engine.dualar.loader import load_model
from engine.dualar.model import DualAR
from engine.dualar.scheduler import Scheduler, SchedulerConfig, Sequence, StepResult, _seed
from tests.engine.dualar import MODEL_DIR, golden

PURE_GREEDY = Sampling(temperature=0.0, top_k=1)  # top_k 1: repetition-aware redraws pick the argmax too
Job = tuple[torch.Tensor, Sampling, int]  # prompt (1 + C, T), settings, generator seed


def fixture_model(device: str = "cpu", dtype: str = "float32") -> DualAR:
    model = load_model(MODEL_DIR, device=device, dtype=dtype, progress=False)
    model.setup_caches(4, 512)
    return model


def prompt(length: int) -> torch.Tensor:
    return torch.from_numpy(golden("c")["prompt"])[:, :length]


def greedy(frames: int) -> Sampling:
    return Sampling(temperature=0.0, top_k=1, max_frames=frames)


class Recorder(GraphedDecoder):
    """A decoder that remembers the row count of every replay and which rows were active."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls: list[tuple[int, list[int]]] = []

    def step(self, n: int) -> torch.Tensor:
        self.calls.append((n, self.state.active[:n].nonzero().flatten().tolist()))
        return super().step(n)


def static(model: DualAR, config: SchedulerConfig, *, graphs: bool = False) -> Scheduler:
    decoder = Recorder(model, max_batch=config.max_batch_size, max_seq_len=model.slow.cache_len, use_graphs=graphs)
    return Scheduler(model, config, decoder=decoder)


def run(s: Scheduler, jobs: list[Job], *, join_after: int = 0, limit: int = 500) -> tuple[list[torch.Tensor], list[StepResult]]:
    """Submit ``jobs`` (the last one ``join_after`` steps later), step until all finish: frames (C, n) and steps."""
    first, late = (jobs[:-1], jobs[-1:]) if join_after else (jobs, [])
    seqs = [s.submit(p, sampling, generator=torch.Generator().manual_seed(seed)) for p, sampling, seed in first]
    steps: list[StepResult] = []
    for _ in range(limit):
        if len(steps) == join_after and late:
            seqs += [s.submit(p, sampling, generator=torch.Generator().manual_seed(seed)) for p, sampling, seed in late]
        if len(seqs) == len(jobs) and all(q.finish is not None for q in seqs):
            return [_frames(q) for q in seqs], steps
        steps.append(s.step())
    raise AssertionError("sequences did not finish")


def _frames(seq: Sequence) -> torch.Tensor:
    return torch.stack(list(seq.output), dim=1) if seq.output else torch.zeros(10, 0, dtype=torch.long)


NO_CACHE = SchedulerConfig(max_batch_size=3, prefill_chunk=64, prefix_cache=False, output_frames=1 << 10)


# ---- CPU: the graphed path's function, run eagerly


def test_the_cpu_default_is_the_eager_step() -> None:
    assert SchedulerConfig().cuda_graphs
    model = fixture_model()
    s = Scheduler(model, SchedulerConfig(max_batch_size=2))
    assert s.decoder is None and not s.graphed
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(model, SchedulerConfig(max_batch_size=4), decoder=GraphedDecoder(model, max_batch=2, max_seq_len=512))


def test_greedy_codes_and_step_results_equal_the_eager_schedulers() -> None:
    model = fixture_model()
    jobs = [(prompt(174), greedy(12), 0), (prompt(120), greedy(5), 1), (prompt(150), greedy(9), 2),
            (prompt(90), greedy(10), 3), (prompt(60), greedy(8), 4)]
    eager_frames, eager_steps = run(Scheduler(model, NO_CACHE), jobs, join_after=3)
    s = static(model, NO_CACHE)
    graphed_frames, graphed_steps = run(s, jobs, join_after=3)
    for a, b in zip(eager_frames, graphed_frames, strict=True):
        assert a.shape[1] > 0 and torch.equal(a, b)
    assert graphed_steps == eager_steps  # same prefill chunks, decode batches, frames, finishes
    assert not s.graphed and s.decoder is not None


def test_a_seeded_stream_gets_the_same_frames_whatever_runs_beside_it() -> None:
    model = fixture_model()
    config = SchedulerConfig(max_batch_size=4, prefill_chunk=48, prefix_cache=False, output_frames=1 << 10)
    target = (prompt(100), Sampling(temperature=0.9, top_p=0.9, top_k=40, seed=7, max_frames=14), 0)
    alone, _ = run(static(model, config), [target])
    others = [(prompt(150), Sampling(temperature=1.0, seed=1, max_frames=20), 0),
              (prompt(70), greedy(6), 0)]
    s = static(model, config)
    together, _ = run(s, [*others, target])  # slot 2: replays of 3 rows padded to 4, then 2 after the greedy one ends
    assert torch.equal(together[2], alone[0]) and alone[0].shape[1] == 14
    assert {n for n, _ in s.decoder.calls} >= {3}  # type: ignore[union-attr]
    reseeded = (target[0], Sampling(temperature=0.9, top_p=0.9, top_k=40, seed=8, max_frames=14), 0)
    assert not torch.equal(run(static(model, config), [reseeded])[0][0], alone[0])


def test_paused_prefilling_and_free_slots_are_padding_rows() -> None:
    model = fixture_model()
    config = SchedulerConfig(max_batch_size=4, prefill_chunk=32, prefix_cache=False, output_frames=2)
    s = static(model, config)
    decoder = s.decoder
    assert isinstance(decoder, Recorder)
    idle = s.submit(prompt(60), greedy(12))  # slot 0: nobody takes its frames, it pauses
    busy = s.submit(prompt(40), greedy(30))  # slot 1
    got: list[torch.Tensor] = []
    for _ in range(8):
        s.step()
        got += s.take(busy, 100).frames
    assert len(idle.output) == 2 and idle.finish is None
    long = s.submit(prompt(174), greedy(3))  # slot 2, prefilling in chunks of 32 beside the decode of slot 1
    for _ in range(3):
        s.step()
        got += s.take(busy, 100).frames
    assert decoder.calls[-1] == (2, [1])  # slots 0..1 replayed: the paused slot 0 as padding
    taken: list[torch.Tensor] = []
    for _ in range(100):
        got += s.take(busy, 100).frames
        taken += s.take(idle, 100).frames
        if idle.finish and busy.finish and long.finish:
            break
        s.step()
    assert (3, [0, 1, 2]) in decoder.calls or (3, [1, 2]) in decoder.calls  # 3 rows padded to 4: slot 3 free
    for seq, frames in ((idle, taken), (busy, got)):
        alone, _ = run(static(model, NO_CACHE), [(seq.prompt, seq.sampling, 0)])
        assert torch.equal(torch.stack(frames, dim=1), alone[0])


def test_the_prefix_cache_feeds_the_graphed_path() -> None:
    model = fixture_model()
    config = SchedulerConfig(max_batch_size=2, prefill_chunk=64, output_frames=1 << 10)
    s = static(model, config)
    first, _ = run(s, [(prompt(150), greedy(8), 0)])
    seq = s.submit(prompt(150), greedy(8))
    steps = []
    while seq.finish is None:
        steps.append(s.step())
    assert seq.reused == 149 and steps[0].prefilled == 1  # the last position only, through the graph
    assert torch.equal(_frames(seq), first[0])
    eager, _ = run(Scheduler(model, config), [(prompt(150), greedy(8), 0)])
    assert torch.equal(first[0], eager[0])


def test_the_counter_seed_comes_from_the_request_then_its_generator() -> None:
    p = torch.zeros(11, 4, dtype=torch.long)
    assert _seed(Sequence(p, Sampling(seed=5), torch.Generator().manual_seed(9))) == 5
    assert _seed(Sequence(p, Sampling(), torch.Generator().manual_seed(9))) == 9
    assert _seed(Sequence(p, Sampling())) != _seed(Sequence(p, Sampling()))  # unseeded: random


# ---- GPU: the captured step


def _s2pro(dtype: str) -> tuple[DualAR, Callable[[int, int], torch.Tensor]]:
    from engine.gpucheck import build_model, random_prompt

    model = build_model("s2pro", "cuda", dtype)
    model.setup_caches(4, 640)
    return model, lambda length, seed: random_prompt(model, length, seed)


def _models(which: str, dtype: str) -> tuple[DualAR, Callable[[int, int], torch.Tensor]]:
    if which == "fixture":
        return fixture_model("cuda", dtype), lambda length, seed: prompt(length)
    return _s2pro(dtype)


@pytest.mark.parametrize("which", ["fixture", "s2pro"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_captured_scheduler_equals_its_step_run_eagerly_on_cuda(which: str) -> None:
    model, make = _models(which, "bfloat16")
    jobs = [(make(174, 0), greedy(24), 0), (make(120, 1), Sampling(temperature=0.8, seed=3, max_frames=20), 1),
            (make(90, 2), Sampling(temperature=0.0, max_frames=16), 2), (make(60, 3), greedy(12), 3)]
    config = SchedulerConfig(max_batch_size=3, prefill_chunk=64, prefix_cache=False, output_frames=1 << 10)
    graphed = Scheduler(model, config)
    assert graphed.graphed
    a, steps_a = run(graphed, jobs, join_after=3)
    b, steps_b = run(static(model, config, graphs=False), jobs, join_after=3)
    assert steps_a == steps_b
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("which", ["fixture", "s2pro"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_captured_scheduler_gives_the_eager_schedulers_greedy_codes_on_cuda(which: str) -> None:
    # float32: the two compute the same numbers in different kernels (attention over the whole cache vs the used
    # part, the last prompt position alone vs in its chunk); bfloat16 rounding could flip a near-tied argmax
    model, make = _models(which, "float32")
    jobs = [(make(174, 0), greedy(24), 0), (make(120, 1), greedy(16), 1), (make(90, 2), greedy(20), 2),
            (make(60, 3), greedy(12), 3)]
    config = SchedulerConfig(max_batch_size=3, prefill_chunk=64, prefix_cache=False, output_frames=1 << 10)
    graphed = Scheduler(model, config)
    assert graphed.graphed
    a, _ = run(graphed, jobs, join_after=3)
    b, _ = run(Scheduler(model, dataclasses.replace(config, cuda_graphs=False)), jobs, join_after=3)
    for x, y in zip(a, b, strict=True):
        assert x.shape[1] > 0 and torch.equal(x, y)
