"""The context budget: history dropped oldest first, in large steps, the same way every turn."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.base import PastTurn
from engine.dualar.context import history_start, trim_history, turn_positions
from engine.dualar.loader import load_config
from engine.dualar.prompt import PromptBuilder
from tests.engine.dualar import MODEL_DIR


def test_nothing_is_dropped_within_the_budget() -> None:
    assert history_start([], 100) == 0
    assert history_start([30, 30, 40], 100) == 0


def test_outgrowing_the_budget_drops_down_to_half_of_it_in_one_step() -> None:
    assert history_start([30, 30, 40, 10], 100) == 2  # 110 > 100: drop until <= 50 (40 + 10)
    assert history_start([30, 30, 40, 10, 20, 20], 100) == 2  # 90: no new drop
    assert history_start([30, 30, 40, 10, 20, 20, 15], 100) == 5  # 105 > 100: down to 20 + 15 = 35 <= 50
    assert history_start([200], 100) == 1  # a turn longer than the budget goes too
    with pytest.raises(ValueError):
        history_start([1], 0)


def test_consecutive_turns_drop_the_same_way_and_only_in_large_steps() -> None:
    rng = random.Random(7)
    lengths = [rng.randint(20, 120) for _ in range(300)]
    budget = 1000
    starts = [history_start(lengths[:n], budget) for n in range(len(lengths) + 1)]
    drops = 0
    for n in range(1, len(starts)):
        kept = sum(lengths[starts[n] : n])
        assert kept <= budget
        assert starts[n] >= starts[n - 1]
        if starts[n] != starts[n - 1]:  # a drop: it leaves at most half the budget
            drops += 1
            assert kept <= budget // 2
            assert sum(lengths[starts[n - 1] : n]) > budget
    assert 10 <= drops <= len(lengths) * 70 / (budget / 2)  # about once per half a budget of new turns


def test_prompts_extend_each_other_between_drops() -> None:
    config = load_config(MODEL_DIR)
    prompts = PromptBuilder.from_pretrained(MODEL_DIR, config)
    rng = np.random.default_rng(0)
    history: list[PastTurn] = []
    budget, last, extended, dropped = 1000, None, 0, 0
    for i in range(30):
        kept = trim_history(prompts, history, budget)
        assert sum(turn_positions(prompts, t) for t in kept) <= budget
        prompt = prompts.build(f"Line number {i}.", speaker=i % 2, history=kept)
        if last is not None:
            if torch.equal(prompt[:, : last.shape[1] - 12], last[:, :-12]):  # all but the generation header
                extended += 1
            else:
                dropped += 1
        last = prompt
        history.append(PastTurn(i % 2, f"Line number {i}.", rng.integers(0, 32, (10, int(rng.integers(5, 40))))))
    assert dropped >= 2 and extended >= 4 * dropped
    assert turn_positions(prompts, PastTurn(0, "x", None)) == 0
