"""Request and response conversion between Shoal and SGLang: plans round-trip, sampling maps, frames come out once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.base import PastTurn, Sampling, SynthesisRequest, VoiceRef
from engine.dualar.config import load_config
from engine.dualar.frontend import frame_budget
from engine.dualar.prompt import PromptBuilder
from engine.sglang.convert import (
    FLAG_FAILED,
    FLAG_RAS,
    FRAME_KEY,
    FrameCursor,
    RequestPlan,
    TokenIds,
    build_request,
)
from engine.sglang.keys import is_frame_key, radix_keys
from tests.engine.dualar import MODEL_DIR

IDS = TokenIds(semantic_begin_id=268, semantic_end_id=331, im_end_id=258, vocab_size=336, num_codebooks=10,
               codebook_size=64)


def conversation_prompt() -> torch.Tensor:
    """A prompt with a voice reference and two past turns: three audio spans between text."""
    rng = np.random.default_rng(0)

    def codes(n: int) -> np.ndarray:
        return rng.integers(0, 64, (10, n)).astype(np.int16)

    prompts = PromptBuilder.from_pretrained(MODEL_DIR, load_config(MODEL_DIR))
    request = SynthesisRequest(
        "And now the third line.",
        voices={0: VoiceRef("v", "Reference words.", codes(9))},
        history=[PastTurn(0, "First line.", codes(5)), PastTurn(0, "Second line.", codes(7))],
    )
    return prompts.build_request(request)


def test_the_plan_carries_every_code_and_rebuilds_the_prompt() -> None:
    prompt = conversation_prompt()
    request = build_request(prompt, Sampling(seed=7), IDS)
    plan = RequestPlan.from_custom(json.loads(json.dumps(request.sampling_params["custom_params"])), 10)
    assert plan.prompt_len == prompt.shape[1] == len(request.input_ids)
    codes, audio = plan.window(0, plan.prompt_len)
    rebuilt = np.zeros_like(prompt.numpy())
    rebuilt[1:] = codes.T
    rebuilt[0] = np.where(audio, IDS.semantic_begin_id + codes[:, 0], request.input_ids)
    np.testing.assert_array_equal(rebuilt, prompt.numpy())
    assert len(plan.spans) == 6  # three audio spans: the voice, the two past turns
    assert [is_frame_key(k) for k in request.input_ids] == audio.tolist()
    assert request.input_ids == radix_keys(prompt, IDS.semantic_begin_id, IDS.semantic_end_id)


@pytest.mark.parametrize("cut", [1, 40, 77, 100])
def test_windows_of_a_chunked_prompt_add_up_to_the_whole(cut: int) -> None:
    plan = build_request(conversation_prompt(), Sampling(), IDS).plan
    cut = min(cut, plan.prompt_len - 1)
    whole_codes, whole_audio = plan.window(0, plan.prompt_len)
    a_codes, a_audio = plan.window(0, cut)
    b_codes, b_audio = plan.window(cut, plan.prompt_len)
    np.testing.assert_array_equal(np.concatenate([a_codes, b_codes]), whole_codes)
    np.testing.assert_array_equal(np.concatenate([a_audio, b_audio]), whole_audio)
    with pytest.raises(ValueError):
        plan.window(0, plan.prompt_len + 1)


def test_custom_params_are_flat_json_values() -> None:
    """SGLang's custom_params allow scalars and flat lists of scalars (they cross msgpack IPC)."""
    prompt = np.zeros((11, 6), dtype=np.int64)
    prompt[0] = [1, 2, 270, 271, 3, 4]
    prompt[1:, 2:4] = 5
    custom = build_request(prompt, Sampling(), IDS).sampling_params["custom_params"]
    for value in custom.values():
        assert isinstance(value, (int, float, str, bool)) or (
            isinstance(value, list) and all(isinstance(v, (int, float, str, bool)) for v in value)
        )
    assert json.loads(json.dumps(custom)) == custom


def test_sampling_maps_to_a_greedy_sglang_request_and_a_plan() -> None:
    prompt = np.array([[1, 2, 3]] + [[0, 0, 0]] * 10)
    sampling = Sampling(temperature=0.6, top_p=0.7, top_k=12, seed=42, max_frames=100)
    request = build_request(prompt, sampling, IDS, max_frames=50, rid="r1")
    params = request.sampling_params
    assert request.rid == "r1" and request.input_ids == [1, 2, 3]
    assert params["max_new_tokens"] == 50 and params["temperature"] == 0.0 and params["stop_token_ids"] == [258]
    assert params["stream_interval"] == 1
    plan = request.plan
    assert (plan.temperature, plan.top_p, plan.top_k, plan.seed, plan.allow_end) == (0.6, 0.7, 12, 42, True)
    assert build_request(prompt, sampling, IDS).sampling_params["max_new_tokens"] == 100  # sampling.max_frames
    assert not build_request(prompt, sampling, IDS, allow_end=False).plan.allow_end


def test_a_request_without_a_seed_gets_a_random_one_and_a_fresh_rid() -> None:
    prompt = np.array([[1, 2, 3]] + [[0, 0, 0]] * 10)
    a, b = build_request(prompt, Sampling(), IDS), build_request(prompt, Sampling(), IDS)
    assert a.plan.seed != b.plan.seed and 0 <= a.plan.seed < 2**62
    assert a.rid != b.rid
    assert build_request(prompt, Sampling(seed=2**70 + 5), IDS).plan.seed == (2**70 + 5) % 2**62


@pytest.mark.parametrize(
    "change",
    [{"shoal": 2}, {"t": -1.0}, {"p": 0.0}, {"k": -1}, {"seed": -1}, {"spans": [0]}, {"spans": [5, 1, 2, 1]},
     {"codes": "!!"}, {"n": 0}, {"spans": [0, 99]}],
)
def test_a_malformed_plan_is_a_value_error(change: dict) -> None:
    prompt = np.zeros((11, 4), dtype=np.int64)
    prompt[0] = [1, 270, 271, 2]
    custom = build_request(prompt, Sampling(), IDS).sampling_params["custom_params"]
    RequestPlan.from_custom(custom, 10)
    with pytest.raises(ValueError):
        RequestPlan.from_custom({**custom, **change}, 10)


def test_no_plan_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no Shoal plan"):
        RequestPlan.from_custom(None, 10)


def test_frame_budget_counts_spoken_characters_only() -> None:
    assert frame_budget("Hello.", per_char=6, base=32) == 32 + 36
    assert frame_budget("<|speaker:1|>[whisper] Hello.", per_char=6, base=32) == 32 + 36
    assert frame_budget("", per_char=6, base=32) == 32


# ------------------------------------------------------------------------------------------------ responses


def row(main: int, code: int = 1, flags: int = 0) -> np.ndarray:
    return np.array([main, main - 268 if main >= 268 else 0, *([code] * 9), flags], dtype=np.int32)


def outputs(rows: list[np.ndarray], finish: dict | None, *, cumulative: bool = True, prompt: int = 50,
            cached: int = 40) -> list[dict]:
    """SGLang's stream for ``rows``, one output per token: cumulative lists (default) or deltas."""
    out = []
    for i in range(len(rows)):
        meta = {
            "completion_tokens": i + 1,
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            FRAME_KEY: list(rows[: i + 1]) if cumulative else [rows[i]],
            "finish_reason": finish if i == len(rows) - 1 else None,
        }
        out.append({"output_ids": [int(r[0]) for r in rows[: i + 1]], "meta_info": meta})
    return out


def test_frames_come_out_once_each_and_im_end_ends_them() -> None:
    rows = [row(270, 1), row(280, 2, FLAG_RAS), row(290, 3), row(258)]
    cursor = FrameCursor(IDS)
    updates = [cursor.feed(o) for o in outputs(rows, {"type": "stop", "matched": 258})]
    codes = np.concatenate([u.codes for u in updates], axis=1)
    assert codes.shape == (10, 3) and codes.dtype == np.int16
    assert codes[0].tolist() == [2, 12, 22] and codes[1].tolist() == [1, 2, 3]
    assert [u.done for u in updates] == [False, False, False, True]
    assert updates[-1].reason == "complete" and updates[-1].error is None
    assert sum(u.ras for u in updates) == 1
    assert (updates[-1].prompt_tokens, updates[-1].cached_tokens) == (50, 40)


def test_coalesced_outputs_give_every_frame() -> None:
    """SGLang may coalesce several steps into one output (a slow reader): nothing is lost or repeated."""
    rows = [row(270 + i) for i in range(6)]
    stream = outputs(rows, {"type": "length", "length": 6})
    cursor = FrameCursor(IDS)
    taken = [cursor.feed(stream[i]) for i in (1, 4, 5)]
    assert [u.codes.shape[1] for u in taken] == [2, 3, 1]
    assert taken[-1].reason == "length"


@pytest.mark.parametrize(
    ("finish", "reason"),
    [({"type": "length", "length": 3}, "length"), ({"type": "abort", "message": "stopped"}, "cancelled"),
     ({"type": "weird"}, "error")],
)
def test_finish_reasons(finish: dict, reason: str) -> None:
    cursor = FrameCursor(IDS)
    last = [cursor.feed(o) for o in outputs([row(270), row(271), row(272)], finish)][-1]
    assert last.done and last.reason == reason


def test_a_lost_request_is_an_error_not_audio() -> None:
    cursor = FrameCursor(IDS)
    updates = [cursor.feed(o) for o in outputs([row(270), row(258, flags=FLAG_FAILED)], {"type": "stop"})]
    assert updates[0].codes.shape[1] == 1
    assert updates[1].done and updates[1].reason == "error" and "retracted" in updates[1].error
    assert updates[1].codes.shape[1] == 0


def test_a_malformed_frame_row_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        FrameCursor(IDS).feed({"meta_info": {"completion_tokens": 1, FRAME_KEY: [np.zeros(5)]}})
