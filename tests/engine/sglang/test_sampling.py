"""Per-request sampling inside one batched step: counter RNG, the shared filters, RAS, the end mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.base import Sampling
from engine.dualar.sampling import RAS_WINDOW, Sampler, SamplingParams, logits_to_probs
from engine.sglang.sampling import counter_uniform, draw_main, draw_residual, sample_with_noise

MAIN_IDS = torch.tensor([2, 10, 11, 12, 13, 14, 15])  # <|im_end|> = 2 (column 0), semantic 10..15
SEMANTIC = (10, 15)


def params(rows: int, temperature: float = 0.8, top_p: float = 0.8, top_k: int = 30) -> SamplingParams:
    return SamplingParams.of([Sampling(temperature=temperature, top_p=top_p, top_k=top_k)] * rows)


def test_counter_uniform_is_a_pure_function_in_the_open_unit_interval() -> None:
    seed, step = torch.tensor([1, 2, 2**61 + 7]), torch.tensor([0, 0, 5])
    u = counter_uniform(seed, step, 3, 1000)
    assert u.shape == (3, 1000) and u.dtype == torch.float32
    assert torch.equal(u, counter_uniform(seed, step, 3, 1000))
    assert (u > 0).all() and (u < 1).all()
    assert not torch.equal(u[0], u[1])  # seeds differ
    assert not torch.equal(u, counter_uniform(seed, step, 4, 1000))  # streams differ
    assert not torch.equal(u, counter_uniform(seed, step + 1, 3, 1000))  # steps differ
    # a row depends on its own seed and step only, not on the rest of the batch
    assert torch.equal(counter_uniform(seed[2:], step[2:], 3, 1000)[0], u[2])


def test_counter_uniform_looks_uniform() -> None:
    u = counter_uniform(torch.arange(64), torch.zeros(64, dtype=torch.long), 0, 4096).flatten().numpy()
    hist, _ = np.histogram(u, bins=16, range=(0, 1))
    expected = u.size / 16
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < 45  # 15 degrees of freedom: p ~ 1e-4
    assert abs(u.mean() - 0.5) < 0.005


def test_draws_follow_the_filtered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = SamplingParams.of([Sampling(temperature=0.9, top_p=0.95, top_k=4)])
    expected = logits_to_probs(logits, p)[0].numpy()
    rows = 20000
    noise = -torch.log(counter_uniform(torch.arange(rows), torch.zeros(rows, dtype=torch.long), 0, 6))
    batch = SamplingParams(p.temperature.expand(rows), p.top_p.expand(rows), p.top_k.expand(rows))
    drawn = sample_with_noise(logits.expand(rows, -1), batch, noise)
    freq = np.bincount(drawn.numpy(), minlength=6) / rows
    np.testing.assert_allclose(freq, expected, atol=0.012)
    assert freq[4] == 0 and freq[5] == 0  # cut by top-k / top-p


def test_temperature_zero_and_top_k_one_are_greedy() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    noise = -torch.log(counter_uniform(torch.arange(5), torch.zeros(5, dtype=torch.long), 0, 50))
    for p in (params(5, temperature=0.0), params(5, top_k=1)):
        assert torch.equal(sample_with_noise(logits, p, noise), logits.argmax(-1))


def draw(allowed: torch.Tensor, window: torch.Tensor, *, temperature: float = 0.8, seeds: torch.Tensor | None = None,
         allow_end: bool = True):
    rows = allowed.shape[0]
    return draw_main(
        allowed,
        MAIN_IDS,
        params(rows, temperature=temperature),
        window,
        seed=torch.arange(rows) if seeds is None else seeds,
        step=torch.zeros(rows, dtype=torch.long),
        semantic_range=SEMANTIC,
        allow_end=torch.full((rows,), allow_end),
        end_column=0,
    )


def test_main_draw_is_greedy_at_temperature_zero_like_the_torch_backend() -> None:
    allowed = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    window = torch.full((4, RAS_WINDOW), -1)
    out = draw(allowed, window, temperature=0.0)
    for i in range(4):  # no repetition yet, so no RAS: the torch backend's sampler gives the same token
        sampler = Sampler(Sampling(temperature=0.0), main_ids=MAIN_IDS, semantic_range=SEMANTIC)
        full = torch.full((1, 16), -1e9)
        full[0, MAIN_IDS] = allowed[i]
        assert int(sampler.main(full)[0]) == int(out.token[i])
    assert not out.ras.any()
    assert torch.equal(out.window[:, -1], out.token) and (out.window[:, :-1] == -1).all()


def test_a_repeated_semantic_token_is_redrawn_at_the_ras_settings() -> None:
    allowed = torch.full((200, 7), -5.0)
    allowed[:, 3] = 5.0  # token 12 is the near-certain first draw
    window = torch.full((200, RAS_WINDOW), -1)
    window[:100, 4] = 12  # rows 0..99 said 12 recently
    out = draw(allowed, window, temperature=0.0)
    assert out.ras[:100].all() and not out.ras[100:].any()
    assert (out.token[100:] == 12).all()
    # the redraw is a draw at temperature 1 / top-p 0.9, not the greedy pick: when the winner is less certain,
    # some rows move away from it
    allowed[:, 3] = -4.5
    out = draw(allowed, window, temperature=0.0)
    assert out.ras[:100].all() and (out.token[:100] != 12).any()


def test_end_token_is_never_redrawn_and_can_be_masked() -> None:
    allowed = torch.full((8, 7), -5.0)
    allowed[:, 0] = 10.0  # <|im_end|> is the clear winner
    window = torch.full((8, RAS_WINDOW), 2)  # even if it "repeats"
    out = draw(allowed, window, temperature=0.0)
    assert (out.token == 2).all() and not out.ras.any()
    masked = draw(allowed, window, temperature=0.0, allow_end=False)
    assert (masked.token != 2).all()


def test_seeded_rows_are_reproducible_and_independent_of_the_batch() -> None:
    allowed = torch.randn(6, 7, generator=torch.Generator().manual_seed(2))
    window = torch.full((6, RAS_WINDOW), -1)
    seeds = torch.tensor([5, 6, 7, 8, 9, 10])
    full = draw(allowed, window, seeds=seeds).token
    alone = torch.cat([draw(allowed[i : i + 1], window[i : i + 1], seeds=seeds[i : i + 1]).token for i in range(6)])
    assert torch.equal(full, alone)
    reordered = draw(allowed.flip(0), window, seeds=seeds.flip(0)).token
    assert torch.equal(reordered.flip(0), full)


@pytest.mark.parametrize("level", [1, 5, 9])
def test_residual_levels_draw_from_their_own_streams(level: int) -> None:
    logits = torch.zeros(2000, 64)  # uniform: every draw is the noise alone
    seed, step = torch.zeros(2000, dtype=torch.long) + 3, torch.arange(2000)
    p = params(2000, temperature=1.0, top_p=1.0, top_k=0)
    a = draw_residual(logits, p, seed=seed, step=step, level=level)
    b = draw_residual(logits, p, seed=seed, step=step, level=level + 1 if level < 9 else 1)
    assert torch.equal(a, draw_residual(logits, p, seed=seed, step=step, level=level))
    assert (a != b).float().mean() > 0.9
    assert np.bincount(a.numpy(), minlength=64).min() > 10  # every code reachable
