"""Generation with the dual AR: ``prefill``, ``decode_step`` and the ``stream`` of codec frames.

One frame: the slow AR reads the next input column(s) and gives logits and a final-norm hidden state at the last
position; the main token is sampled (semantic or ``<|im_end|>``); the fast AR, seeded with that hidden state, turns
the semantic code into 9 residual codes. The frame's column ``[main token; semantic code; 9 residuals]`` is the
slow AR's next input. ``prefill`` makes the first frame from the prompt, ``decode_step`` each later one.

:func:`stream` yields the (10,) codes of every audio frame as soon as it is made and never yields the
``<|im_end|>`` column. ``max_frames`` bounds the frames yielded. (The reference's ``generate_long`` always drops
the last column it generated, so with ``max_new_tokens = n`` it returns n - 1 frames even when none is
``<|im_end|>``; ``stream`` with ``max_frames = n - 1`` yields exactly those frames, one step sooner.)

:func:`sample_frame` is the part after the slow AR, shared with the batching scheduler (``scheduler.py``), which
runs the slow AR itself over the sequences' KV cache slots.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from engine.base import Sampling
from engine.dualar.model import DualAR
from engine.dualar.sampling import Sampler, main_token_ids

__all__ = ["Frame", "decode_step", "generate", "make_sampler", "prefill", "sample_frame", "stream"]


class Frame(NamedTuple):
    column: Tensor  # (B, 1 + C): main token id, semantic code, C - 1 residual codes
    logits: Tensor  # (B, V) slow AR logits the main token was drawn from
    hidden: Tensor  # (B, D) slow AR final-norm hidden state, the fast AR's seed
    fast_logits: Tensor  # (B, C, codebook size); [:, k] predicted code k (k >= 1); [:, 0] is discarded


def make_sampler(
    model: DualAR, sampling: Sampling, *, batch_size: int = 1, generator: torch.Generator | None = None
) -> Sampler:
    """A sampler for ``batch_size`` sequences with the same settings; seeded from ``sampling.seed`` if no generator."""
    c = model.config
    device = model.slow.norm.weight.device
    if generator is None and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    return Sampler(
        [sampling] * batch_size,
        main_ids=main_token_ids(c.semantic_begin_id, c.semantic_end_id, c.im_end_id, device),
        semantic_range=(c.semantic_begin_id, c.semantic_end_id),
        generator=generator,
    )


def sample_frame(model: DualAR, hidden: Tensor, sampler: Sampler) -> Frame:
    """One whole frame per row from the slow AR's final-norm state at its last position, ``hidden`` (B, D): the main
    token, then the fast AR's 9-step loop over the codebooks, batched across the B rows (fast cache rows 0..B-1)."""
    c = model.config
    logits = model.slow.logits(hidden)  # (B, V)
    main = sampler.main(logits)  # (B,)
    code = (main - c.semantic_begin_id).clamp(0, c.codebook_size - 1)  # <|im_end|> -> 0, as the reference
    positions = torch.arange(c.num_codebooks, device=hidden.device)
    codes, fast_logits = [code], [model.fast(hidden[:, None], positions[:1])[:, -1]]
    for k in range(1, c.num_codebooks):
        step_logits = model.fast(model.fast.embeddings(code)[:, None], positions[k : k + 1])[:, -1]  # (B, size)
        code = sampler.residual(step_logits)
        codes.append(code)
        fast_logits.append(step_logits)
    column = torch.stack([main, *codes], dim=1)  # (B, 1 + C)
    return Frame(column, logits, hidden, torch.stack(fast_logits, dim=1))


def prefill(model: DualAR, prompt: Tensor, input_pos: Tensor, sampler: Sampler) -> Frame:
    """Run the slow AR over ``prompt`` (B, 1 + C, S) at ``input_pos`` (S,) or (B, S), filling the KV cache, and
    make the first frame. ``input_pos`` may start past 0 when the cache already holds the earlier positions."""
    hidden = model.slow(prompt, input_pos)[:, -1]  # (B, D)
    return sample_frame(model, hidden, sampler)


def decode_step(model: DualAR, column: Tensor, input_pos: Tensor, sampler: Sampler) -> Frame:
    """Feed the last frame's ``column`` (B, 1 + C) at ``input_pos`` (1,) or (B, 1) and make the next frame."""
    hidden = model.slow(column[:, :, None], input_pos)[:, -1]  # (B, D)
    return sample_frame(model, hidden, sampler)


@torch.inference_mode()
def stream(
    model: DualAR,
    prompt: Tensor,
    sampling: Sampling | None = None,
    *,
    cancel: threading.Event | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield the (C,) int64 codes (semantic, then residuals) of each frame, on the model's device, as made.

    Stops at ``<|im_end|>`` (not yielded), after ``sampling.max_frames`` frames, when the KV cache is full, or when
    ``cancel`` is set (checked before the prompt is read and between frames). Uses batch row 0 of the model's
    caches (allocated on first use), so one stream runs per model at a time; the prompt is prefilled whole.
    """
    sampling = Sampling() if sampling is None else sampling
    c = model.config
    if prompt.dim() != 2 or prompt.shape[0] != 1 + c.num_codebooks:
        raise ValueError(f"prompt must have shape ({1 + c.num_codebooks}, T), got {tuple(prompt.shape)}")
    length = prompt.shape[1]
    model.setup_caches(max(1, model.max_batch_size), model.slow.cache_len or None)
    if not 0 < length < model.slow.cache_len:
        raise ValueError(f"prompt length {length} must be within [1, {model.slow.cache_len - 1}] (the KV cache)")
    max_frames = min(sampling.max_frames, model.slow.cache_len - length + 1)
    device = model.slow.norm.weight.device
    sampler = make_sampler(model, sampling, generator=generator)
    if cancel is not None and cancel.is_set():
        return
    frame = prefill(model, prompt.to(device)[None], torch.arange(length, device=device), sampler)
    for n in range(max_frames):
        column = frame.column[0]
        if int(column[0]) == c.im_end_id:
            return
        yield column[1:]
        if n + 1 == max_frames or (cancel is not None and cancel.is_set()):
            return
        frame = decode_step(model, frame.column, torch.tensor([length + n], device=device), sampler)


def generate(
    model: DualAR, prompt: Tensor, sampling: Sampling | None = None, *, generator: torch.Generator | None = None
) -> Tensor:
    """All frames of :func:`stream` at once: (C, frames) int64 on the CPU."""
    frames = [codes.cpu() for codes in stream(model, prompt, sampling, generator=generator)]
    c = model.config.num_codebooks
    return torch.stack(frames, dim=1) if frames else torch.zeros(c, 0, dtype=torch.long)
