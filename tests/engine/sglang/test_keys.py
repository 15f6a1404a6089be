"""Radix keys: every code of a frame is part of its key; text keeps its ids; a conversation's keys only grow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.sglang.keys import FRAME_KEY_BASE, frame_keys, is_frame_key, radix_keys, shared_prefix_len

BEGIN, END = 268, 268 + 4095  # the presets' semantic range (4096 semantic tokens)


def prompt_with(frames: np.ndarray, text_before: int = 5, text_after: int = 3) -> np.ndarray:
    """(11, T): some text ids, an audio span holding ``frames`` (10, n), more text."""
    n = frames.shape[1]
    out = np.zeros((11, text_before + n + text_after), dtype=np.int64)
    out[0, :text_before] = np.arange(10, 10 + text_before)
    out[0, text_before : text_before + n] = BEGIN + frames[0]
    out[1:, text_before : text_before + n] = frames
    out[0, text_before + n :] = np.arange(100, 100 + text_after)
    return out


def random_frames(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(0, 4096, (1, n)), rng.integers(0, 1024, (9, n))])


def test_equal_prompts_have_equal_keys() -> None:
    a, b = prompt_with(random_frames(6)), prompt_with(random_frames(6))
    assert radix_keys(a, BEGIN, END) == radix_keys(b, BEGIN, END)
    assert radix_keys(torch.from_numpy(a), BEGIN, END) == radix_keys(a, BEGIN, END)  # tensor or array


@pytest.mark.parametrize("level", range(1, 10))
def test_a_residual_code_of_one_frame_changes_the_key_from_that_frame_on(level: int) -> None:
    frames = random_frames(8)
    other = frames.copy()
    other[level, 3] = (other[level, 3] + 1) % 1024  # residual code `level` of frame 3, nothing else
    a, b = prompt_with(frames), prompt_with(other)
    assert (a[0] == b[0]).all()  # the semantic tokens (what sglang-omni keyed) are all equal
    ka, kb = radix_keys(a, BEGIN, END), radix_keys(b, BEGIN, END)
    frame_position = 5 + 3
    assert ka[:frame_position] == kb[:frame_position]
    assert ka[frame_position] != kb[frame_position]
    assert shared_prefix_len(ka, kb) == frame_position  # a radix tree shares nothing from that frame on


def test_each_codebook_level_counts_and_codes_do_not_commute() -> None:
    frame = np.arange(10)[:, None] + 5
    keys = {int(frame_keys(frame)[0])}
    for level in range(10):
        changed = frame.copy()
        changed[level] += 1
        keys.add(int(frame_keys(changed)[0]))
    swapped = frame.copy()
    swapped[[1, 2]] = swapped[[2, 1]]
    keys.add(int(frame_keys(swapped)[0]))
    assert len(keys) == 12


def test_text_positions_keep_their_token_ids_and_audio_positions_get_frame_keys() -> None:
    prompt = prompt_with(random_frames(4))
    keys = radix_keys(prompt, BEGIN, END)
    assert keys[:5] == list(range(10, 15)) and keys[-3:] == [100, 101, 102]
    audio = keys[5:9]
    assert all(is_frame_key(k) and FRAME_KEY_BASE <= k < FRAME_KEY_BASE + 2**61 for k in audio)
    assert not any(is_frame_key(k) for k in keys[:5] + keys[-3:])
    assert all(k < 2**62 for k in keys)  # fits SGLang's int64 token ids
    assert len(set(audio)) == 4


def test_generated_semantic_ids_never_equal_a_prompt_key() -> None:
    """SGLang keys generated positions by the sampled semantic id; no prompt position can hold one."""
    prompt = prompt_with(random_frames(50, seed=3))
    keys = radix_keys(prompt, BEGIN, END)
    assert not any(BEGIN <= k <= END for k in keys)


def test_the_next_turn_extends_the_keys_of_the_last_one() -> None:
    turn1 = prompt_with(random_frames(5, seed=1))
    audio = random_frames(7, seed=2)
    spoken = np.zeros((11, 7), dtype=np.int64)
    spoken[0], spoken[1:] = BEGIN + audio[0], audio
    turn2 = np.concatenate([turn1, spoken, prompt_with(random_frames(0), 4, 0)], axis=1)
    k1, k2 = radix_keys(turn1, BEGIN, END), radix_keys(turn2, BEGIN, END)
    assert k2[: len(k1)] == k1
    assert shared_prefix_len(k1, k2) == len(k1)


def test_frame_keys_are_a_fixed_function() -> None:
    """No hash randomization: a restarted worker, or another process, computes the same keys (pinned values)."""
    assert frame_keys(np.arange(10)[:, None]).tolist() == [2267330418311226814]
    assert frame_keys(np.zeros((10, 3), dtype=np.int16)).tolist() == [949145488899732094] * 3


@pytest.mark.parametrize("bad", [np.zeros(10), np.full((10, 2), -1), np.full((10, 1), 1 << 16), np.ones((10, 2)) * 0.5])
def test_bad_codes_are_a_value_error(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        frame_keys(bad)


def test_shared_prefix_len() -> None:
    assert shared_prefix_len([1, 2, 3], [1, 2, 3, 4]) == 3
    assert shared_prefix_len([1, 2, 3], [1, 5, 3]) == 1
    assert shared_prefix_len([], [1]) == 0
