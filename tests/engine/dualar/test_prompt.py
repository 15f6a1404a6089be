"""The chat prompt: fixture a token for token, voices, speaker tags, and the stable prefix across turns."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from engine.base import PastTurn, Sampling, SynthesisRequest, VoiceRef
from engine.dualar.config import load_config
from engine.dualar.prompt import PromptBuilder, load_tokenizer
from tests.engine.dualar import FIXTURES, MODEL_DIR, golden



@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder.from_pretrained(MODEL_DIR, load_config(MODEL_DIR))


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((FIXTURES / "ar_meta.json").read_text())


def _codes(seed: int, frames: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, size=(10, frames), dtype=np.int16)


def test_fixture_prompt_exactly(builder: PromptBuilder, meta: dict) -> None:
    ref = golden("a")["ref_codes"].astype(np.int16)  # as VoiceRef stores them
    prompt = builder.build(meta["text"], voices={0: VoiceRef("v0", meta["ref_text"], ref)})
    assert prompt.dtype == torch.int64
    assert torch.equal(prompt, torch.from_numpy(golden("a")["prompt"]))
    assert builder.render(prompt) == meta["prompt_decoded"]


def test_plain_values_and_requests_give_the_same_prompt(builder: PromptBuilder, meta: dict) -> None:
    ref = golden("a")["ref_codes"]
    expected = torch.from_numpy(golden("a")["prompt"])
    assert torch.equal(builder.build(meta["text"], voices=[(meta["ref_text"], ref)]), expected)
    request = SynthesisRequest(meta["text"], voices={0: VoiceRef("v0", meta["ref_text"], ref)}, sampling=Sampling())
    assert torch.equal(builder.build_request(request), expected)


def test_audio_rows_hold_codes_and_row_zero_the_semantic_token(builder: PromptBuilder) -> None:
    codes = _codes(1, 5)
    span = builder.audio(codes)
    assert span.shape == (11, 5)
    assert torch.equal(span[0], torch.from_numpy(codes[0].astype(np.int64)) + 268)
    assert torch.equal(span[1:], torch.from_numpy(codes.astype(np.int64)))
    text = builder.text("Hi")
    assert text[0].tolist() == [72, 105] and not text[1:].any()


def test_no_voices_uses_the_plain_system_prompt(builder: PromptBuilder) -> None:
    prompt = builder.build("Hello.")
    assert builder.render(prompt) == (
        "<|im_start|>system\nconvert the provided text to speech<|im_end|>\n"
        "<|im_start|>user\n<|speaker:0|>Hello.<|im_end|>\n<|im_start|>assistant\n<|voice|>"
    )
    assert not prompt[1:].any()


def test_several_voices_are_tagged_by_speaker_and_share_one_audio_span(builder: PromptBuilder) -> None:
    a, b = _codes(1, 3), _codes(2, 4)
    voices = {2: VoiceRef("b", "Second.", b), 0: VoiceRef("a", "<|speaker:0|>First.", a), 1: VoiceRef("x", "No codes")}
    prompt = builder.build("Hi", voices=voices)
    text = builder.render(prompt)
    assert (
        "Text:\n<|speaker:0|>First.\n<|speaker:2|>Second.\n\nSpeech:\n" in text
    )  # tagged once; no-code voice left out
    assert "No codes" not in text
    audio = prompt[:, (prompt[0] >= 268) & (prompt[0] <= 331)]
    assert torch.equal(audio[1:], torch.from_numpy(np.concatenate([a, b], axis=1).astype(np.int64)))


def test_user_text_is_tagged_with_its_speaker_unless_it_starts_with_a_tag(builder: PromptBuilder) -> None:
    assert "user\n<|speaker:3|>Hi [whisper] there<|im_end|>" in builder.render(builder.user("Hi [whisper] there", 3))
    assert "user\n<|speaker:1|>Hi <|speaker:0|>yo<|im_end|>" in builder.render(
        builder.user("<|speaker:1|>Hi <|speaker:0|>yo", 3)
    )
    assert "user\n<|speaker:2|>A <|speaker:1|>B<|im_end|>" in builder.render(builder.user("A <|speaker:1|>B", 2))


def test_next_turn_extends_the_previous_prompt_token_for_token(builder: PromptBuilder) -> None:
    voices = {0: VoiceRef("v", "Hello.", _codes(3, 6))}
    first = builder.build("One.", voices=voices)
    codes1 = _codes(4, 7)
    second = builder.build("Two.", speaker=1, voices=voices, history=[PastTurn(0, "One.", codes1)])
    assert torch.equal(second[:, : first.shape[1]], first)
    assert torch.equal(builder.extend(first, codes1, "Two.", speaker=1), second)
    assert torch.equal(builder.extend(first, torch.from_numpy(codes1).long(), "Two.", speaker=1), second)
    third = builder.extend(second, _codes(5, 2), "Three.")
    history = [PastTurn(0, "One.", codes1), (1, "Two.", _codes(5, 2))]
    assert torch.equal(builder.build("Three.", voices=voices, history=history), third)
    assert torch.equal(third[:, : second.shape[1]], second)
    assert builder.render(third).count("<|im_start|>assistant\n<|voice|>") == 3


def test_past_turns_without_codes_are_left_out(builder: PromptBuilder) -> None:
    with_gap = builder.build("Two.", history=[PastTurn(0, "One.", None)])
    assert torch.equal(with_gap, builder.build("Two."))


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (np.zeros((9, 3), dtype=np.int16), r"shape \(10, frames\)"),
        (np.full((10, 3), 64, dtype=np.int16), r"within \[0, 64\)"),
        (np.full((10, 3), -1, dtype=np.int16), r"within \[0, 64\)"),
        (np.zeros((10, 3), dtype=np.float32), "integers"),
    ],
)
def test_bad_codes_are_value_errors(builder: PromptBuilder, codes: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        builder.build("Hi", voices=[("Hello.", codes)])


def test_tokenizer_must_agree_with_the_config() -> None:
    with pytest.raises(ValueError, match=re.escape("<|semantic:0|> = 268, config says 300")):
        PromptBuilder(load_tokenizer(MODEL_DIR), semantic_begin_id=300, num_codebooks=10, codebook_size=64)
