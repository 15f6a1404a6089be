"""Generation: greedy with KV cache against fixture c step by step, the frame stream, its stops and cancel."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.base import Sampling
from engine.dualar import generate as gen
from engine.dualar.generate import decode_step, generate, make_sampler, prefill, stream
from engine.dualar.loader import load_model
from engine.dualar.model import DualAR
from engine.dualar.sampling import Sampler
from tests.engine.dualar import MODEL_DIR, golden

ATOL = 1e-5
GREEDY = Sampling(temperature=0.0, max_frames=9)


@pytest.fixture(scope="module")
def model() -> DualAR:
    model = load_model(MODEL_DIR, dtype="float32", progress=False)
    model.setup_caches(2, 512)
    return model


def _t(key: str) -> torch.Tensor:
    return torch.from_numpy(golden("c")[key])


@torch.inference_mode()
def test_greedy_generation_matches_every_step(model: DualAR) -> None:
    prompt, length = _t("prompt"), _t("prompt").shape[1]
    sampler = make_sampler(model, GREEDY)
    frames = [prefill(model, prompt[None], torch.arange(length), sampler)]
    for n in range(8):
        frames.append(decode_step(model, frames[-1].column, torch.tensor([length + n]), sampler))
    torch.testing.assert_close(torch.stack([f.logits[0] for f in frames]), _t("slow_logits"), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack([f.hidden[0] for f in frames]), _t("slow_hidden"), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack([f.fast_logits[0] for f in frames]), _t("fast_logits"), atol=ATOL, rtol=0)
    assert torch.equal(torch.stack([f.column[0] for f in frames], dim=1), _t("generated"))


def test_stream_yields_the_reference_frames(model: DualAR) -> None:
    prompt = _t("prompt")
    frames = list(stream(model, prompt, Sampling(temperature=0.0, max_frames=8)))
    assert all(f.shape == (10,) and f.dtype == torch.int64 for f in frames)
    assert torch.equal(torch.stack(frames, dim=1), _t("codes_generate_long"))  # what the reference returns
    assert torch.equal(generate(model, prompt, GREEDY), _t("generated")[1:])  # and the frame it dropped


@torch.inference_mode()
def test_batch_of_two_generates_each_row_as_alone(model: DualAR) -> None:
    prompt, length = _t("prompt"), _t("prompt").shape[1]
    sampler = make_sampler(model, GREEDY, batch_size=2)
    frame = prefill(model, torch.stack([prompt, prompt]), torch.arange(length), sampler)
    columns = [frame.column]
    for n in range(3):
        frame = decode_step(model, frame.column, torch.tensor([[length + n], [length + n]]), sampler)
        columns.append(frame.column)
    both = torch.stack(columns, dim=2)  # (2, 11, 4)
    assert torch.equal(both[0], _t("generated")[:, :4]) and torch.equal(both[1], _t("generated")[:, :4])


def test_stream_stops_at_im_end_without_yielding_it(model: DualAR, monkeypatch: pytest.MonkeyPatch) -> None:
    original = model.slow.logits
    calls = 0

    def logits_then_im_end(hidden: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        out = original(hidden)
        if calls == 4:
            out[:, model.config.im_end_id] = 1e4
        return out

    monkeypatch.setattr(model.slow, "logits", logits_then_im_end)
    frames = list(stream(model, _t("prompt"), GREEDY))
    assert calls == 4
    assert torch.equal(torch.stack(frames, dim=1), _t("generated")[1:, :3])


def test_cancel_stops_between_frames(model: DualAR, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = 0
    original = gen.decode_step

    def counting_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal steps
        steps += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(gen, "decode_step", counting_step)
    cancel = threading.Event()
    received = []
    for codes in stream(model, _t("prompt"), GREEDY, cancel=cancel):
        received.append(codes)
        if len(received) == 2:
            cancel.set()
    assert len(received) == 2 and steps == 1  # the frame in hand is kept, no step after the flag
    assert torch.equal(torch.stack(received, dim=1), _t("generated")[1:, :2])

    cancel = threading.Event()
    cancel.set()
    prefills = []
    monkeypatch.setattr(gen, "prefill", lambda *a, **k: prefills.append(1))
    assert list(stream(model, _t("prompt"), GREEDY, cancel=cancel)) == [] and not prefills


def test_stream_runs_in_a_worker_thread_and_cancels_from_another(model: DualAR) -> None:
    cancel, got = threading.Event(), []

    def consume() -> None:
        for codes in stream(model, _t("prompt"), Sampling(temperature=0.0, max_frames=1000), cancel=cancel):
            got.append(codes)
            if len(got) == 3:
                cancel.set()  # as a gateway's cancel would, from its own thread, between frames

    worker = threading.Thread(target=consume)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and len(got) == 3


def test_seeded_sampling_is_reproducible(model: DualAR) -> None:
    sampling = Sampling(temperature=0.8, top_p=0.8, top_k=30, seed=1234, max_frames=6)
    first, again = generate(model, _t("prompt"), sampling), generate(model, _t("prompt"), sampling)
    assert torch.equal(first, again)
    assert first.shape[0] == 10 and 0 < first.shape[1] <= 6
    assert int(first.min()) >= 0 and int(first.max()) < model.config.codebook_size


def test_kv_cache_bounds_the_frames_and_the_prompt() -> None:
    model = _small(180)
    frames = generate(model, _t("prompt"), Sampling(temperature=0.0, max_frames=100))
    assert torch.equal(frames, _t("generated")[1:, :7])  # positions 174..179 hold 6 fed-back columns
    with pytest.raises(ValueError, match="prompt length 174 must be within"):
        generate(_small(174), _t("prompt"))
    with pytest.raises(ValueError, match="prompt must have shape"):
        generate(model, _t("prompt")[:5])


def _small(cache_len: int) -> DualAR:
    model = load_model(MODEL_DIR, dtype="float32", progress=False)
    model.setup_caches(1, cache_len)
    return model


def test_bfloat16_stream_smoke() -> None:
    model = load_model(MODEL_DIR, dtype="bfloat16", progress=False)
    frames = generate(model, _t("prompt"), Sampling(seed=5, max_frames=5))
    assert frames.shape[0] == 10 and frames.shape[1] <= 5
    assert int(frames.min()) >= 0 and int(frames.max()) < model.config.codebook_size


def _uncached_frame(model: DualAR, sequence: torch.Tensor, sampler: Sampler) -> tuple[torch.Tensor, ...]:
    """One frame with no KV cache anywhere: the slow AR reads the whole sequence so far, and the fast AR re-reads
    its whole prefix (seed + codes so far) for each residual. sequence: (1, 1 + C, S)."""
    c = model.config
    hidden = model.slow(sequence)[:, -1]  # (1, D), input_pos None: a plain causal pass, cache untouched
    logits = model.slow.logits(hidden)
    main = sampler.main(logits)
    code = (main - c.semantic_begin_id).clamp(0, c.codebook_size - 1)
    inputs, codes = hidden[:, None], [code]  # (1, 1, D)
    fast_logits = [model.fast(inputs)[:, -1]]
    for _ in range(1, c.num_codebooks):
        inputs = torch.cat([inputs, model.fast.embeddings(code)[:, None]], dim=1)  # (1, k + 1, D)
        step_logits = model.fast(inputs)[:, -1]
        code = sampler.residual(step_logits)
        codes.append(code)
        fast_logits.append(step_logits)
    return torch.stack([main, *codes], dim=1), logits, hidden, torch.stack(fast_logits, dim=1)


@torch.inference_mode()
def test_kv_cached_generation_equals_recomputing_the_whole_prefix_every_step(model: DualAR) -> None:
    """Greedy, 16 frames (past the fixture's 9): the cached loop and a loop that recomputes everything from the
    prompt at every step (fed through an identically seeded sampler, so RAS draws agree) give the same codes, and
    logits / hidden states / fast logits within float32 noise."""
    prompt, length, steps = _t("prompt"), _t("prompt").shape[1], 16
    greedy = Sampling(temperature=0.0, seed=11)
    cached_sampler, uncached_sampler = make_sampler(model, greedy), make_sampler(model, greedy)
    frame = prefill(model, prompt[None], torch.arange(length), cached_sampler)
    sequence = prompt[None]  # (1, 11, S)
    for n in range(steps):
        column, logits, hidden, fast_logits = _uncached_frame(model, sequence, uncached_sampler)
        torch.testing.assert_close(frame.logits, logits, atol=ATOL, rtol=0, msg=f"slow logits, step {n}")
        torch.testing.assert_close(frame.hidden, hidden, atol=ATOL, rtol=0, msg=f"hidden, step {n}")
        torch.testing.assert_close(frame.fast_logits, fast_logits, atol=ATOL, rtol=0, msg=f"fast logits, step {n}")
        assert torch.equal(frame.column, column), f"codes differ at step {n}"
        if n < _t("generated").shape[1]:
            assert torch.equal(column[0], _t("generated")[:, n])
        sequence = torch.cat([sequence, column[:, :, None]], dim=2)
        frame = decode_step(model, frame.column, torch.tensor([length + n]), cached_sampler)
