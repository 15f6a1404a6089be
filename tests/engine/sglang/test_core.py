"""The SGLang model's torch core on the CPU, against the reference fixtures and the torch backend.

A stand-in RadixAttention (per-request contiguous KV) and a mini scheduler (``fakes``) feed the core batches shaped
like SGLang's: flattened extend passes (whole, chunked, on a reused prefix), decode passes padded like a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.base import PastTurn, Sampling, SynthesisRequest
from engine.dualar.config import load_config
from engine.dualar.generate import generate
from engine.dualar.loader import load_model, load_state_dict
from engine.dualar.model import DualAR
from engine.dualar.prompt import PromptBuilder
from engine.sglang.convert import FLAG_FAILED, TokenIds, build_request
from engine.sglang.core import BatchInfo
from tests.engine.dualar import MODEL_DIR, golden
from tests.engine.sglang.fakes import MiniRunner, make_core

GREEDY = Sampling(temperature=0.0, seed=0, max_frames=9)


@pytest.fixture(scope="module")
def config():
    return load_config(MODEL_DIR)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_state_dict(MODEL_DIR, progress=False)


@pytest.fixture
def core(config, weights):
    core = make_core(config)
    core.load_published(weights.items())
    return core.eval()


@pytest.fixture(scope="module")
def prompts(config) -> PromptBuilder:
    return PromptBuilder.from_pretrained(MODEL_DIR, config)


def fixture_request(config, sampling: Sampling = GREEDY, **kw):
    return build_request(torch.from_numpy(golden("c")["prompt"]), sampling, TokenIds.of(config), **kw)


def columns(rows: np.ndarray) -> np.ndarray:
    """(frames, 2 + C) model rows -> (1 + C, frames) columns as the fixtures store them."""
    return rows[:, :-1].T


def test_greedy_generation_matches_the_reference_fixture(core, config) -> None:
    runner = MiniRunner(core)
    rows = runner.generate(fixture_request(config), slot=3, frames=9)
    np.testing.assert_array_equal(columns(rows), golden("c")["generated"])
    hidden = torch.cat(runner.hidden)
    torch.testing.assert_close(hidden, torch.from_numpy(golden("c")["slow_hidden"]), atol=1e-5, rtol=0)
    assert (rows[:, -1] == 0).all()  # no flags: RAS never fired, nothing failed


def test_parameter_names_and_shapes_are_the_torch_backends(core, config) -> None:
    reference = {k: tuple(v.shape) for k, v in DualAR(config).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in core.state_dict().items()} == reference


def test_loading_reports_missing_and_misshapen_tensors(config, weights) -> None:
    core = make_core(config)
    partial = {k: v for k, v in weights.items() if "layers.1." not in k}
    with pytest.raises(ValueError, match="missing"):
        core.load_published(partial.items())
    bad = dict(weights)
    bad["text_model.model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="shape mismatches"):
        core.load_published(bad.items())
    core.load_published([*weights.items(), ("audio_decoder.something_new", torch.ones(1))])  # extra: a warning


def test_a_batch_of_different_requests_decodes_each_as_alone(core, config, prompts) -> None:
    ids = TokenIds.of(config)
    a = fixture_request(config)
    b = build_request(prompts.build_request(SynthesisRequest("Short one.")), GREEDY, ids)
    alone = [MiniRunner(core).generate(a, 1, 5), MiniRunner(core).generate(b, 2, 5)]
    runner = MiniRunner(core)
    first = runner.extend([(1, a, 0, a.prompt_len), (2, b, 0, b.prompt_len)])
    together = [[first[0]], [first[1]]]
    for step in range(4):
        rows = runner.decode([(1, a.prompt_len + step, int(together[0][-1][0])),
                              (2, b.prompt_len + step, int(together[1][-1][0]))])
        together[0].append(rows[0])
        together[1].append(rows[1])
    np.testing.assert_array_equal(np.stack(together[0]), alone[0])
    np.testing.assert_array_equal(np.stack(together[1]), alone[1])


def test_a_prompt_prefilled_in_chunks_gives_the_same_frames(core, config) -> None:
    request = fixture_request(config)
    whole = MiniRunner(core).generate(request, 1, 4)
    runner = MiniRunner(core)
    n = request.prompt_len
    cuts = [0, 50, 111, n]  # chunk boundaries inside and around the reference audio span (108..119)
    for start, stop in zip(cuts, cuts[1:], strict=False):
        frame = runner.extend([(1, request, start, stop)])[0]
    rows = [frame]
    for i in range(3):
        rows.append(runner.decode([(1, n + i, int(rows[-1][0]))])[0])
    np.testing.assert_array_equal(np.stack(rows), whole)


def test_a_request_on_a_cached_prefix_gives_the_same_frames(core, config, prompts) -> None:
    """Turn 2 of a conversation, its prefix (turn 1's prompt and audio) reused from the cache."""
    ids = TokenIds.of(config)
    turn1 = prompts.build_request(SynthesisRequest("First line."))
    audio = np.random.default_rng(0).integers(0, 64, (10, 6))
    request = SynthesisRequest("Second line.", history=[PastTurn(0, "First line.", audio)])
    turn2 = build_request(prompts.build_request(request), GREEDY, ids)
    cached = build_request(prompts.extend(turn1, audio, "Second line."), GREEDY, ids)
    assert cached.input_ids == turn2.input_ids
    reference = MiniRunner(core).generate(turn2, 1, 4)
    runner = MiniRunner(core)
    warm = build_request(torch.cat([turn1, prompts.audio(audio), prompts.text("<|im_end|>\n")], dim=1), GREEDY, ids)
    shared = warm.prompt_len  # turn 1's prompt, its audio, <|im_end|>\n
    assert turn2.input_ids[:shared] == warm.input_ids  # the keys the synthesizer's warm-up puts in the cache
    runner.extend([(5, warm, 0, shared)])  # the warm-up request fills slot 5 with the shared prefix
    runner.pool.copy_prefix(5, 1, shared)  # a radix hit: the new request starts on those positions
    rows = [runner.extend([(1, turn2, shared, turn2.prompt_len)])[0]]
    for i in range(3):
        rows.append(runner.decode([(1, turn2.prompt_len + i, int(rows[-1][0]))])[0])
    np.testing.assert_array_equal(np.stack(rows), reference)


def test_padding_rows_of_a_captured_graph_change_nothing(core, config) -> None:
    request = fixture_request(config)
    n = request.prompt_len
    reference = MiniRunner(core).generate(request, 3, 4)
    runner = MiniRunner(core)
    rows = [runner.extend([(3, request, 0, n)])[0]]
    before = {name: getattr(core, name).clone() for name in ("slot_codes", "slot_step", "slot_main")}
    for i in range(3):
        rows.append(runner.decode([(3, n + i, int(rows[-1][0]))], pad_to=4)[0])
    np.testing.assert_array_equal(np.stack(rows), reference)
    for name, old in before.items():  # only slot 3 (the request) and slot 0 (the padding slot) changed
        changed = (getattr(core, name) != old).reshape(old.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        assert set(changed) <= {0, 3}, name


def test_an_unprepared_extend_changes_no_request_state(core, config) -> None:
    """SGLang's warm-up and memory-profiling runs call forward without prepare_for_forward."""
    runner = MiniRunner(core)
    request = fixture_request(config)
    runner.extend([(3, request, 0, request.prompt_len)])
    state = {name: buf.clone() for name, buf in core.named_buffers() if name.startswith("slot_")}
    ctx = object()
    with torch.inference_mode():
        out = core.step(torch.tensor([5, 6, 7, 1 << 41]), torch.arange(4), _Dummy(), decode=False,
                        extend_lens=torch.tensor([4]), token=ctx)
    assert out.logits.shape == (1, config.slow.vocab_size)
    for name, old in state.items():
        assert torch.equal(dict(core.named_buffers())[name], old), name


class _Dummy:
    """A pass no attention layer keeps: a fresh slot-less context for the stand-in attention."""

    def __init__(self) -> None:
        from tests.engine.sglang.fakes import KVPool

        self.pool, self.slots, self.starts, self.lens = KVPool(), [0], [0], [4]


def test_a_request_without_a_plan_is_ended_with_an_error_flag(core, config) -> None:
    request = fixture_request(config)
    broken = type(request)(request.rid, request.input_ids, {**request.sampling_params, "custom_params": None},
                           request.plan)
    frame = MiniRunner(core).extend([(2, broken, 0, broken.prompt_len)])[0]
    assert frame[0] == config.im_end_id and frame[-1] & FLAG_FAILED


def test_a_retracted_request_resumed_by_a_new_owner_is_ended(core, config) -> None:
    request = fixture_request(config)
    runner = MiniRunner(core)
    n = request.prompt_len
    runner.extend([(2, request, 0, n)])
    # SGLang resumes a retracted request by prefilling prompt + generated tokens, maybe in another slot
    resumed = type(request)(request.rid, request.input_ids + [300, 301], request.sampling_params, request.plan)
    frame = runner.extend([(4, resumed, 0, n + 2)])[0]
    assert frame[-1] & FLAG_FAILED


def test_a_running_request_inside_an_extend_batch_continues_from_its_slot(core, config) -> None:
    """A mixed batch: one request's next frame is computed in an extend pass (SGLang's mixed chunks)."""
    request = fixture_request(config)
    n = request.prompt_len
    reference = MiniRunner(core).generate(request, 3, 3)
    runner = MiniRunner(core)
    first = runner.extend([(3, request, 0, n)])[0]
    extended = type(request)(request.rid, request.input_ids + [int(first[0])], request.sampling_params, request.plan)
    second = runner.extend([(3, extended, n, n + 1)])[0]
    third = runner.decode([(3, n + 1, int(second[0]))])[0]
    np.testing.assert_array_equal(np.stack([first, second, third]), reference)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(core, config) -> None:
    sampled = Sampling(temperature=0.8, top_p=0.9, top_k=20, seed=11, max_frames=6)
    a = fixture_request(config, sampled, rid="a")
    other = fixture_request(config, Sampling(temperature=1.0, seed=99), rid="b")
    alone = MiniRunner(core).generate(a, 1, 6)
    np.testing.assert_array_equal(MiniRunner(core).generate(a, 7, 6), alone)  # another slot, same frames
    runner = MiniRunner(core)
    n = a.prompt_len
    first = runner.extend([(2, other, 0, n), (1, a, 0, n)])
    rows, other_main = [first[1]], int(first[0][0])
    for i in range(5):
        both = runner.decode([(2, n + i, other_main), (1, n + i, int(rows[-1][0]))])
        rows.append(both[1])
        other_main = int(both[0][0])
    np.testing.assert_array_equal(np.stack(rows), alone)
    c = fixture_request(config, Sampling(temperature=0.8, top_p=0.9, top_k=20, seed=12, max_frames=6))
    assert not np.array_equal(MiniRunner(core).generate(c, 1, 6), alone)


def test_greedy_frames_equal_the_torch_backend_on_another_prompt(core, config, prompts) -> None:
    model = load_model(MODEL_DIR, dtype="float32", progress=False)
    prompt = prompts.build_request(SynthesisRequest("Hello there, how are you?"))
    sampling = Sampling(temperature=0.0, seed=0, max_frames=5)  # RAS first fires at frame 6 for this prompt
    expected = generate(model, prompt, sampling, generator=torch.Generator().manual_seed(0)).numpy()
    rows = MiniRunner(core).generate(build_request(prompt, sampling, TokenIds.of(config)), 1, 5)
    assert not (rows[:, -1] & 1).any()  # (a RAS redraw uses other random numbers than the torch backend's)
    np.testing.assert_array_equal(rows[:, 1:-1].T, expected)


def test_a_batch_beyond_the_model_bounds_fails_its_rows_not_the_process(core, config) -> None:
    """SGLang's scheduler dies on an exception from the model (and SIGQUITs Shoal): the pass's requests end with an
    error frame instead, and the next pass runs normally."""
    rows = core.max_rows + 1
    core.prepare(BatchInfo(decode=True, rows=rows, slots=torch.ones(rows)))  # does not raise
    assert core.failed_pass is not None and "max_rows" in core.failed_pass
    with torch.inference_mode():
        out = core.guarded_step(torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long), _Dummy(),
                                decode=True)
    assert out.frames.shape[0] == rows
    assert (out.frames[:, 0] == config.im_end_id).all() and (out.frames[:, -1] & FLAG_FAILED).all()
    assert (out.logits.argmax(-1) == config.im_end_id).all()  # SGLang's greedy sampler stops them
    core.prepare(BatchInfo(decode=True, rows=1, slots=torch.ones(1)))
    assert core.failed_pass is None
