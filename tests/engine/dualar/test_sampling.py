"""Sampling properties: the main-token mask, greedy, top-k / top-p, seeds, repetition-aware resampling."""

from __future__ import annotations

import math

import torch

from engine.base import Sampling
from engine.dualar.sampling import RAS_WINDOW, Sampler, SamplingParams, logits_to_probs, main_token_ids, sample

SEMANTIC = (10, 19)  # a toy vocabulary of 32: semantic ids 10..19, <|im_end|> = 3
IM_END = 3


def _sampler(sampling: Sampling | list[Sampling], seed: int = 0) -> Sampler:
    return Sampler(
        sampling,
        main_ids=main_token_ids(*SEMANTIC, IM_END),
        semantic_range=SEMANTIC,
        generator=torch.Generator().manual_seed(seed),
    )


def _params(temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> SamplingParams:
    return SamplingParams.of(Sampling(temperature=temperature, top_p=top_p, top_k=top_k))


def _logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])


def test_main_token_ids_are_the_semantic_range_and_im_end() -> None:
    assert main_token_ids(*SEMANTIC, IM_END).tolist() == [3, *range(10, 20)]


def test_main_token_is_always_semantic_or_im_end() -> None:
    sampler = _sampler(Sampling(temperature=1.0, top_p=1.0, top_k=0))
    logits = torch.randn(1, 32)
    text = [i for i in range(32) if i != IM_END and not SEMANTIC[0] <= i <= SEMANTIC[1]]
    logits[0, text] += 20.0  # text tokens are by far the likeliest: the mask must still win
    drawn = {int(sampler.main(logits)[0]) for _ in range(300)}
    assert drawn <= {IM_END, *range(10, 20)}
    assert len(drawn) > 3


def test_temperature_zero_is_greedy() -> None:
    logits = torch.randn(4, 32)
    params = _params(temperature=0.0, top_p=0.5, top_k=5)
    for seed in range(3):
        assert torch.equal(sample(logits, params, torch.Generator().manual_seed(seed)), logits.argmax(-1))
    sampler = _sampler(Sampling(temperature=0.0))
    logits[0, 15] = 100.0
    logits[0, 1] = 200.0  # not allowed
    assert int(sampler.main(logits[:1])[0]) == 15


def test_top_k_keeps_only_the_k_likeliest() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, 2.0, -1.0]])
    probs = logits_to_probs(logits, _params(top_k=3))
    assert (probs[0] > 0).nonzero().flatten().tolist() == [1, 3, 4]
    g = torch.Generator().manual_seed(1)
    drawn = {int(sample(logits, _params(top_k=3), g)[0]) for _ in range(200)}
    assert drawn == {1, 3, 4}


def test_top_p_on_the_untempered_distribution_drops_the_token_that_crosses_it() -> None:
    logits = _logits_from_probs([0.5, 0.3, 0.15, 0.05])
    kept = lambda params: (logits_to_probs(logits, params)[0] > 0).nonzero().flatten().tolist()
    assert kept(_params(top_p=0.7)) == [0]  # 0.5 + 0.3 > 0.7: the second is dropped too (the reference's rule)
    assert kept(_params(top_p=0.85)) == [0, 1]
    assert kept(_params(top_p=0.85, temperature=2.0)) == [0, 1]  # temperature comes after: same set
    assert kept(_params(top_p=1.0)) == [0, 1, 2, 3]
    assert kept(_params(top_p=0.85, top_k=1)) == [0]
    tempered = logits_to_probs(logits, _params(top_p=0.85, temperature=2.0))[0]
    assert torch.allclose(tempered[:2], torch.softmax(logits[0, :2] / 2.0, dim=-1))


def test_seeded_draws_are_reproducible() -> None:
    logits = torch.randn(1, 32)
    draws = lambda seed: (
        [int(_sampler(Sampling(), seed).main(logits)[0])]
        + [int(t) for t in _sampler(Sampling(), seed).residual(logits.expand(50, -1))]
    )
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_ras_redraws_a_repeated_semantic_token() -> None:
    logits = torch.full((1, 32), -10.0)
    logits[0, 12], logits[0, 13], logits[0, 14] = 2.0, 1.5, 1.5
    sampler = _sampler(Sampling(temperature=0.0))  # greedy would say 12 every time
    first = int(sampler.main(logits)[0])
    assert first == 12  # not in the window yet
    later = [int(sampler.main(logits)[0]) for _ in range(40)]
    assert set(later) > {12}  # once 12 is in the window it is redrawn at temperature 1.0 / top_p 0.9
    assert sampler.window.shape == (1, RAS_WINDOW) and sampler.window[0].tolist() == later[-RAS_WINDOW:]


def test_ras_only_redraws_semantic_tokens_found_in_the_window() -> None:
    logits = torch.full((1, 32), -10.0)
    logits[0, IM_END] = 5.0
    logits[0, 12] = 4.0
    sampler = _sampler(Sampling(temperature=0.0))
    assert [int(sampler.main(logits)[0]) for _ in range(5)] == [IM_END] * 5  # <|im_end|> is never redrawn
    logits[0, IM_END] = -10.0
    sampler.window[0] = torch.tensor([10, 11, 13, 14, 15, 16, 17, 18, 19, 11])  # busy, but without 12
    assert int(sampler.main(logits)[0]) == 12


def test_residuals_have_no_mask_and_rows_have_their_own_settings() -> None:
    sampler = _sampler([Sampling(temperature=0.0), Sampling(temperature=1.0, top_p=1.0, top_k=0)], seed=3)
    logits = torch.zeros(2, 8)
    logits[:, 0] = 1.0
    rows = torch.stack([sampler.residual(logits) for _ in range(100)])
    assert set(rows[:, 0].tolist()) == {0}  # greedy row
    assert set(rows[:, 1].tolist()) == set(range(8))  # any code may be drawn
