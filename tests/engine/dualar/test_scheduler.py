"""The batching scheduler on the tiny fixture model: batched == alone, chunked prefill, cancel, pause, errors."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.base import Sampling
from engine.dualar.generate import generate
from engine.dualar.loader import load_model
from engine.dualar.model import DualAR
from engine.dualar.scheduler import FinishReason, Scheduler, SchedulerConfig, Sequence
from tests.engine.dualar import MODEL_DIR, golden

ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> DualAR:
    model = load_model(MODEL_DIR, dtype="float32", progress=False)
    model.setup_caches(4, 512)
    return model


def prompt(length: int = 174) -> torch.Tensor:
    return torch.from_numpy(golden("c")["prompt"])[:, :length]


def submit(s: Scheduler, length: int, sampling: Sampling, seed: int, **kw: object) -> Sequence:
    generator = torch.Generator().manual_seed(seed)
    return s.submit(prompt(length), sampling, generator=generator, trace=True, **kw)  # type: ignore[arg-type]


def frames(seq: Sequence) -> torch.Tensor:
    return torch.stack(list(seq.output), dim=1)


def drain(s: Scheduler, *seqs: Sequence, limit: int = 500) -> None:
    for _ in range(limit):
        if all(q.finish is not None for q in seqs):
            return
        s.step()
    raise AssertionError("sequences did not finish")


def test_batched_decode_of_different_lengths_equals_each_decoded_alone(model: DualAR) -> None:
    greedy = lambda n: Sampling(temperature=0.0, max_frames=n)  # noqa: E731
    sampled = Sampling(temperature=0.8, top_p=0.9, top_k=20, max_frames=9)
    jobs = [(174, greedy(12), 0), (120, greedy(5), 1), (150, sampled, 2), (90, greedy(10), 3), (60, greedy(8), 4)]
    batched = Scheduler(model, SchedulerConfig(max_batch_size=3, prefill_chunk=64, prefix_cache=False))
    seqs = [submit(batched, n, sampling, seed) for n, sampling, seed in jobs[:4]]
    for _ in range(3):
        batched.step()
    seqs.append(submit(batched, *jobs[4][:2], jobs[4][2]))  # joins a running batch
    drain(batched, *seqs)
    assert batched.steps_total < sum(n.max_frames for _, n, _ in jobs)  # they did run together
    for (length, sampling, seed), seq in zip(jobs, seqs, strict=True):
        alone = generate(model, prompt(length), sampling, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(frames(seq), alone), f"prompt {length}"
        solo = Scheduler(model, SchedulerConfig(max_batch_size=1, prefix_cache=False))
        single = submit(solo, length, sampling, seed)
        drain(solo, single)
        for a, b in zip(seq.traces, single.traces, strict=True):
            torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    assert {s.finish for s in seqs} == {FinishReason.LENGTH}


def test_chunked_prefill_interleaves_with_the_decode_of_running_sequences(model: DualAR) -> None:
    s = Scheduler(model, SchedulerConfig(max_batch_size=2, prefill_chunk=32, prefix_cache=False))
    running = submit(s, 40, Sampling(temperature=0.0, max_frames=100), 0)
    while not running.output:
        s.step()
    long = submit(s, 174, Sampling(temperature=0.0, max_frames=3), 1)
    steps = []
    while not long.output:
        before = len(running.output)
        steps.append(s.step())
        assert len(running.output) == before + 1  # nobody's next frame waits for the long prompt
    assert [r.prefilled for r in steps] == [32, 32, 32, 32, 32, 14]
    assert all(r.decoded == 1 for r in steps)
    assert steps[-1].frames == 2  # the long prompt's first frame came in the same batch as the decode
    drain(s, long)
    assert torch.equal(frames(long), generate(model, prompt(174), Sampling(temperature=0.0, max_frames=3),
                                              generator=torch.Generator().manual_seed(1)))


def test_cancel_takes_effect_at_the_next_step_and_frees_the_slot(model: DualAR) -> None:
    s = Scheduler(model, SchedulerConfig(max_batch_size=1, prefix_cache=False))
    seq = submit(s, 60, Sampling(temperature=0.0, max_frames=1000), 0)
    for _ in range(4):
        s.step()
    s.cancel(seq)
    made = len(seq.output)
    result = s.step()
    assert seq.finish is FinishReason.CANCELLED and len(seq.output) == made and result.frames == 0
    assert s.running == [] and not s.has_work()
    waiting = submit(s, 60, Sampling(temperature=0.0, max_frames=2), 0)
    s.cancel(waiting)  # cancelled before it ever ran
    s.step()
    assert waiting.finish is FinishReason.CANCELLED and not waiting.output
    again = submit(s, 60, Sampling(temperature=0.0, max_frames=3), 0)
    drain(s, again)
    assert torch.equal(frames(again), frames(seq)[:, :3])


def test_a_paused_sequence_does_not_block_the_others(model: DualAR) -> None:
    s = Scheduler(model, SchedulerConfig(max_batch_size=2, output_frames=2, prefix_cache=False))
    idle = submit(s, 60, Sampling(temperature=0.0, max_frames=50), 0)  # nobody takes its frames
    busy = submit(s, 80, Sampling(temperature=0.0, max_frames=50), 1)
    got: list[torch.Tensor] = []
    for _ in range(10):
        s.step()
        got += s.take(busy, 100).frames
    assert len(idle.output) == 2 and idle.finish is None  # paused at its buffer bound, still holding its slot
    assert len(got) == 10
    assert s.step().decoded == 1
    taken = s.take(idle, 1).frames
    assert len(taken) == 1 and s.step().decoded == 2  # room again: it goes on
    for _ in range(100):
        got += s.take(busy, 100).frames
        taken += s.take(idle, 100).frames
        if idle.finish and busy.finish:
            break
        s.step()
    assert len(got) == len(taken) == 50  # and both run to the end


def test_take_reports_the_finish_once_the_buffer_is_empty(model: DualAR) -> None:
    s = Scheduler(model, SchedulerConfig(max_batch_size=1, prefix_cache=False))
    seq = submit(s, 60, Sampling(temperature=0.0, max_frames=3), 0)
    drain(s, seq)
    first = s.take(seq, 2)
    assert len(first.frames) == 2 and first.finish is None
    last = s.take(seq, 2)
    assert len(last.frames) == 1 and last.finish is FinishReason.LENGTH


def test_the_kv_row_bounds_frames_and_prompts(model: DualAR) -> None:
    small = load_model(MODEL_DIR, dtype="float32", progress=False)
    small.setup_caches(1, 180)
    s = Scheduler(small, SchedulerConfig(max_batch_size=1, prefix_cache=False))
    seq = submit(s, 174, Sampling(temperature=0.0, max_frames=100), 0)
    drain(s, seq)
    assert seq.finish is FinishReason.LENGTH and len(seq.output) == 180 - 174 + 1  # as generate.stream
    with pytest.raises(ValueError, match="must be within"):
        s.submit(prompt(174)[:, :0], Sampling())
    with pytest.raises(ValueError, match="must be within"):
        s.submit(torch.zeros(11, 180, dtype=torch.long), Sampling())
    with pytest.raises(ValueError, match="shape"):
        s.submit(prompt(20)[:5], Sampling())
    with pytest.raises(ValueError):
        SchedulerConfig(max_batch_size=0)


def test_im_end_finishes_without_a_frame(model: DualAR, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Scheduler(model, SchedulerConfig(max_batch_size=2, prefix_cache=False))
    original, calls = model.slow.logits, 0

    def im_end_on_third(hidden: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        out = original(hidden)
        if calls == 3:
            out[:, model.config.im_end_id] = 1e4
        return out

    monkeypatch.setattr(model.slow, "logits", im_end_on_third)
    seq = submit(s, 60, Sampling(temperature=0.0, max_frames=50), 0)
    drain(s, seq)
    assert seq.finish is FinishReason.STOP and len(seq.output) == 2


def wait_for(seq: Sequence, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while seq.finish is None and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_run_loop_serves_other_threads_and_survives_a_failed_step(model: DualAR) -> None:
    s = Scheduler(model, SchedulerConfig(max_batch_size=2, prefix_cache=False))
    stop = threading.Event()
    loop = threading.Thread(target=s.run, args=(stop,), daemon=True)
    loop.start()
    try:
        woken = threading.Event()
        seq = s.submit(prompt(60), Sampling(temperature=0.0, max_frames=4), on_output=woken.set)
        assert woken.wait(30)
        wait_for(seq)
        assert seq.finish is FinishReason.LENGTH and len(seq.output) == 4

        original = model.slow.forward
        failed = threading.Event()

        def broken(*args: object, **kwargs: object) -> torch.Tensor:
            failed.set()
            raise RuntimeError("device lost")

        model.slow.forward = broken  # type: ignore[method-assign]
        try:
            doomed = s.submit(prompt(60), Sampling(temperature=0.0, max_frames=4))
            assert failed.wait(30)
            wait_for(doomed)
        finally:
            model.slow.forward = original  # type: ignore[method-assign]
        assert doomed.finish is FinishReason.ERROR and "device lost" in (doomed.error or "")
        after = s.submit(prompt(60), Sampling(temperature=0.0, max_frames=2))
        wait_for(after)
        assert after.finish is FinishReason.LENGTH
        pending = s.submit(prompt(60), Sampling(temperature=0.0, max_frames=10_000))
    finally:
        stop.set()
        loop.join(30)
    assert not loop.is_alive()
    assert pending.finish in (FinishReason.ERROR, FinishReason.LENGTH)
    assert pending.finish is FinishReason.LENGTH or pending.error == "engine closed"
