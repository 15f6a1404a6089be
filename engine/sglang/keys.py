"""Radix keys of S2 Pro prompts: one int64 per position, covering all 10 codes of an audio position.

SGLang's radix cache matches a new prompt against earlier ones by their token ids, position by position, and reuses
the KV of the longest common prefix. At an S2 Pro audio position the slow AR reads a whole frame, the semantic token
*and* the 10 codec codes, so the KV there depends on all of them. Keying the position by its semantic token alone (as
sglang-omni's first integration did) lets two prompts that differ only in a residual code of one frame share KV that
is right for only one of them. Here:

- a text position keeps its token id (every id is below the vocabulary size);
- an audio position gets a *frame key*: ``FRAME_KEY_BASE`` plus a 61-bit hash of its 10 codes, so it is above every
  vocabulary id and two frames share a key only if all 10 codes are equal (up to a 2**-61 hash collision).

Two prompts that differ in one residual code of frame k have equal keys before k and different keys at k; since the
radix tree matches prefixes, their cached paths part there and nothing after it is shared. The model never reads a
frame key: it gets the codes of the prompt's audio positions alongside the request (``convert``) and the key only
steers the cache.

Generated positions are keyed by SGLang itself with the sampled main token (a semantic id). A prompt never holds a
semantic id (its audio positions hold frame keys), so a generated span is never matched by a later prompt and can
never lend its KV to a frame it was not computed from. The synthesizer instead re-keys each finished turn: it
prefills the turn's audio under frame keys right after the turn (off the critical path), so the next turn's prompt
hits the cache for everything through the end of the previous turn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["FRAME_KEY_BASE", "frame_keys", "is_frame_key", "radix_keys", "shared_prefix_len"]

FRAME_KEY_BASE = 1 << 40  # above any vocabulary id and above SGLang's multimodal pad values (1e6 + 2**30)
_HASH_BITS = 61  # FRAME_KEY_BASE + hash < 2**62: an int64 everywhere SGLang stores ids
_SEED = np.uint64(0x53484F414C000001)  # "SHOAL" + version 1: changing the hash changes every key
_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # x: uint64 array; wrapping arithmetic (SplitMix64 finalizer, a full-avalanche 64-bit mix)
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def frame_keys(codes: np.ndarray | torch.Tensor) -> np.ndarray:
    """(C, frames) integer codes -> (frames,) int64 frame keys, each in [FRAME_KEY_BASE, FRAME_KEY_BASE + 2**61)."""
    array = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if array.ndim != 2:
        raise ValueError(f"codes must have shape (codebooks, frames), got {array.shape}")
    if array.size and (not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() >= 1 << 16):
        raise ValueError("codes must be integers within [0, 65536)")
    with np.errstate(over="ignore"):
        h = np.full(array.shape[1], _SEED, dtype=np.uint64)
        for level, row in enumerate(array.astype(np.uint64)):
            h = _splitmix64(h ^ (row | np.uint64(level << 16)))  # the level is part of the key: codes don't commute
    return (h >> np.uint64(64 - _HASH_BITS)).astype(np.int64) + FRAME_KEY_BASE


def radix_keys(prompt: np.ndarray | torch.Tensor, semantic_begin_id: int, semantic_end_id: int) -> list[int]:
    """The (1 + C, T) prompt matrix -> T keys: token ids at text positions, frame keys at audio positions.

    A position is audio when its row 0 is a semantic token, the same test the model's input embedding makes.
    """
    array = prompt.detach().cpu().numpy() if isinstance(prompt, torch.Tensor) else np.asarray(prompt)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"prompt must have shape (1 + codebooks, T), got {array.shape}")
    ids = array[0].astype(np.int64)
    audio = (ids >= semantic_begin_id) & (ids <= semantic_end_id)
    keys = ids.copy()
    if audio.any():
        keys[audio] = frame_keys(array[1:, audio])
    return keys.tolist()


def is_frame_key(key: int) -> bool:
    return key >= FRAME_KEY_BASE


def shared_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading keys two key sequences share: the KV a radix cache could reuse from one for the other."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n
