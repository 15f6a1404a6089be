"""Token sampling for the dual AR, shared by every backend.

Order, as the reference: top-p on the untempered distribution (a token is dropped once the cumulative probability
up to and including it exceeds top_p; the most likely token always stays), then top-k, then temperature, then one
draw. Temperature 0 is greedy argmax. ``top_k`` 0 and ``top_p`` 1 switch those filters off.

The main token (slow AR) may only be a semantic token or ``<|im_end|>``. Repetition-aware sampling (RAS): when
the drawn main token is semantic and occurs among the last 10 main tokens of its sequence, it is replaced by a draw
at temperature 1.0 / top_p 0.9 (same top_k). RAS applies at every temperature, greedy included, as in the
reference. Both draws are always made, so a seeded generator gives the same stream whether or not RAS fires.
Residual codes (fast AR) use the request's temperature / top-p / top-k with no mask and no RAS.

Everything is batched: logits are (B, V) and each row has its own parameters; no step synchronizes with the host.
Random numbers come from one generator for the whole batch, or from one generator per row (``Generators``): a
scheduler batching independent requests gives each its own seeded generator, and then every row draws exactly the
numbers it would draw decoded alone, whichever rows it shares a step with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from engine.base import Sampling

__all__ = [
    "Generators",
    "RAS_TEMPERATURE",
    "RAS_TOP_P",
    "RAS_WINDOW",
    "Sampler",
    "SamplingParams",
    "logits_to_probs",
    "main_token_ids",
    "sample",
]

RAS_WINDOW = 10  # main tokens remembered per sequence
RAS_TEMPERATURE = 1.0
RAS_TOP_P = 0.9
_MIN_TEMPERATURE = 1e-5  # the reference's clip; rows at 0 are taken greedily instead

Generators = torch.Generator | Sequence[torch.Generator | None] | None  # one for the batch, or one per row


class SamplingParams(NamedTuple):
    temperature: Tensor  # (B,) float32
    top_p: Tensor  # (B,) float32
    top_k: Tensor  # (B,) int64; 0 = off
    k_bound: int = 0  # the largest top_k when every row has one, else 0: only that many candidates need sorting

    @classmethod
    def of(cls, sampling: Sampling | Sequence[Sampling], device: torch.device | str = "cpu") -> SamplingParams:
        rows = [sampling] if isinstance(sampling, Sampling) else list(sampling)
        return cls(
            torch.tensor([s.temperature for s in rows], dtype=torch.float32, device=device),
            torch.tensor([s.top_p for s in rows], dtype=torch.float32, device=device),
            torch.tensor([s.top_k for s in rows], dtype=torch.long, device=device),
            max(s.top_k for s in rows) if all(s.top_k > 0 for s in rows) else 0,
        )

    def with_temperature_top_p(self, temperature: float, top_p: float) -> SamplingParams:
        return SamplingParams(
            torch.full_like(self.temperature, temperature), torch.full_like(self.top_p, top_p), self.top_k, self.k_bound
        )


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    # logits: (B, V) -> probs (B, V) float32 after top-p, top-k and temperature
    logits = logits.float()
    vocab = logits.shape[-1]
    if 0 < params.k_bound < vocab:  # top-k bounds the candidates: a partial sort is enough
        sorted_logits, order = torch.topk(logits, params.k_bound, dim=-1)
    else:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.exp(sorted_logits - torch.logsumexp(logits, dim=-1, keepdim=True)).cumsum(dim=-1)
    rank = torch.arange(sorted_logits.shape[-1], device=logits.device)
    top_k = torch.where(params.top_k > 0, params.top_k, vocab)
    drop = ((cumulative > params.top_p[:, None]) & (params.top_p[:, None] < 1.0)) | (rank >= top_k[:, None])
    drop[:, 0] = False
    drop = torch.ones_like(logits, dtype=torch.bool).scatter(-1, order, drop)  # vocabulary order; unsorted: dropped
    logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits / params.temperature.clamp(min=_MIN_TEMPERATURE)[:, None], dim=-1)


def _race(probs: Tensor, generator: Generators) -> Tensor:
    # (B, V) standard exponential noise: from one generator, or row b from generator[b] (None: the default one)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.empty_like(probs).exponential_(generator=generator)
    rows = zip(probs, generator, strict=True)
    return torch.stack([torch.empty_like(row).exponential_(generator=g) for row, g in rows])


def sample(logits: Tensor, params: SamplingParams, generator: Generators = None) -> Tensor:
    # logits: (B, V) -> (B,) int64 indices into V
    probs = logits_to_probs(logits, params)
    race = _race(probs, generator).clamp_(min=1e-20)
    drawn = torch.argmax(probs / race, dim=-1)  # an exact draw from probs (exponential race)
    return torch.where(params.temperature == 0, torch.argmax(logits, dim=-1), drawn)


def main_token_ids(
    semantic_begin_id: int, semantic_end_id: int, im_end_id: int, device: torch.device | str = "cpu"
) -> Tensor:
    """(M,) the token ids the main token may take, ascending: the semantic range and ``<|im_end|>``."""
    ids = torch.cat([torch.arange(semantic_begin_id, semantic_end_id + 1), torch.tensor([im_end_id])])
    return torch.unique(ids).to(device)


class Sampler:
    """Sampling state of a batch of sequences: parameters, the allowed main tokens, the RAS window, the RNG.

    ``window`` (B, RAS_WINDOW) resumes the RAS windows of sequences sampled before (a scheduler rebuilds the
    sampler of each step from its sequences' state and reads :attr:`window` back); default: empty.
    """

    def __init__(
        self,
        sampling: Sampling | Sequence[Sampling],
        *,
        main_ids: Tensor,
        semantic_range: tuple[int, int],
        generator: Generators = None,
        window: Tensor | None = None,
    ):
        device = main_ids.device
        self.params = SamplingParams.of(sampling, device)
        self.ras_params = self.params.with_temperature_top_p(RAS_TEMPERATURE, RAS_TOP_P)
        self.main_ids = main_ids  # (M,)
        self.semantic_begin_id, self.semantic_end_id = semantic_range
        self.generator = generator
        rows = len(self.params.temperature)
        if window is None:
            window = torch.full((rows, RAS_WINDOW), -1, dtype=torch.long, device=device)
        if window.shape != (rows, RAS_WINDOW):
            raise ValueError(f"window must have shape ({rows}, {RAS_WINDOW}), got {tuple(window.shape)}")
        self.window = window

    def main(self, logits: Tensor) -> Tensor:
        # logits: (B, V) slow AR -> (B,) main token ids; remembers them for RAS
        allowed = logits[:, self.main_ids]  # (B, M): the mask, by gathering only what may be drawn
        normal = self.main_ids[sample(allowed, self.params, self.generator)]
        fallback = self.main_ids[sample(allowed, self.ras_params, self.generator)]
        semantic = (normal >= self.semantic_begin_id) & (normal <= self.semantic_end_id)
        repeated = (self.window == normal[:, None]).any(dim=-1) & semantic
        token = torch.where(repeated, fallback, normal)
        self.window = torch.cat([self.window[:, 1:], token[:, None]], dim=1)
        return token

    def residual(self, logits: Tensor) -> Tensor:
        # logits: (B, codebook size) fast AR -> (B,) codes
        return sample(logits, self.params, self.generator)
