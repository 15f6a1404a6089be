"""The S2 Pro dual-AR transformer: a slow AR over time and a fast AR over the codebooks of one frame.

Both are stacks of pre-norm blocks (RMSNorm in float32, fused ``wqkv`` with rows q | k | v, grouped-query attention,
interleaved GPT-J RoPE, SwiGLU). The slow AR also RMS-normalizes each q/k head before RoPE and shares its output
matrix with its token embeddings. Its input at an audio position is the token embedding plus the sum of the 10
codebook embeddings, scaled by 1/sqrt(11). The fast AR is seeded with the slow AR's final-norm hidden state.

Shapes: B batch, S new positions, L cache length, T prompt length, D model dim, H heads, K kv heads, E head dim,
V vocabulary, C codebooks (10). ``input_pos`` is (S,) shared by the batch or (B, S) per row; None means a plain
causal pass over the S positions without touching the KV cache.

KV cache rows. By default batch row b reads and writes cache row b. A scheduler that keeps each sequence in its own
cache row ("slot") for its whole life passes ``slots``: (B,) cache rows, or a ``slice`` when they are contiguous
(then attention reads a view, no gather). ``kv_len`` bounds the cache positions attention reads (one more than the
largest position of the batch is enough; the rest is masked anyway), which saves the work of attending to the
empty tail of a long cache. :meth:`SlowAR.read_kv` / :meth:`SlowAR.write_kv` copy a slot's keys and values out and
back in, the currency of the prefix cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.dualar.config import FastARConfig, ModelConfig, SlowARConfig, _StackConfig

__all__ = ["DualAR", "FastAR", "KVCache", "RMSNorm", "SlowAR", "Slots", "apply_rope", "rope_table"]

Slots = Tensor | slice  # cache rows of the batch: (B,) int64, or a contiguous range


class KVCache(nn.Module):
    """Keys and values of every layer position, allocated once: (max batch, K, max len, E)."""

    k_cache: Tensor
    v_cache: Tensor

    def __init__(self, max_batch_size: int, max_seq_len: int, n_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(
        self, input_pos: Tensor, k: Tensor, v: Tensor, slots: Slots | None = None, kv_len: int | None = None
    ) -> tuple[Tensor, Tensor]:
        # input_pos: (B, S); k, v: (B, S, K, E) -> the batch's cache rows over the first kv_len positions: (B, K, L, E)
        batch = k.shape[0]
        slots = slice(0, batch) if slots is None else slots
        kv_len = self.k_cache.shape[2] if kv_len is None else kv_len
        if isinstance(slots, slice):
            rows = torch.arange(slots.start, slots.stop, device=k.device)[:, None]
        else:
            rows = slots[:, None]
        self.k_cache[rows, :, input_pos] = k
        self.v_cache[rows, :, input_pos] = v
        return self.k_cache[slots, :, :kv_len], self.v_cache[slots, :, :kv_len]  # a view for a slice, else a gather


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_table(seq_len: int, head_dim: int, base: float) -> Tensor:
    """(seq_len, E/2, 2) cos | sin per position and pair, rounded to bfloat16 as the model was trained, kept float32."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return table.to(torch.bfloat16).float()


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    # x: (B, S, H, E); table: (B, S, E/2, 2); rotates adjacent pairs (x[2i], x[2i+1])
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table[:, :, None].float()
    out = torch.stack(
        [xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1], xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], dim=-1
    )
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: _StackConfig):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = config.n_head, config.n_local_heads, config.head_dim
        self.wqkv = nn.Linear(config.dim, (config.n_head + 2 * config.n_local_heads) * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: Tensor,
        rope: Tensor,
        mask: Tensor | None,
        input_pos: Tensor | None,
        slots: Slots | None = None,
        kv_len: int | None = None,
    ) -> Tensor:
        # x: (B, S, D); rope: (B, S, E/2, 2); mask: (B, 1, S, L) bool or None (causal over S)
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)

        if input_pos is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, S, E)
        else:
            assert self.kv_cache is not None, "setup_caches() before a cached forward"
            k, v = self.kv_cache.update(input_pos, k, v, slots, kv_len)  # (B, K, L, E)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
        )  # (B, H, S, E)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, q_size))


class FeedForward(nn.Module):
    def __init__(self, config: _StackConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: _StackConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(
        self,
        x: Tensor,
        rope: Tensor,
        mask: Tensor | None,
        input_pos: Tensor | None,
        slots: Slots | None = None,
        kv_len: int | None = None,
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos, slots, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class _Stack(nn.Module):
    """Blocks + final norm over input vectors, with its RoPE table and (once set up) KV caches."""

    rope: Tensor  # (max len, E/2, 2)
    layers: nn.ModuleList  # of TransformerBlock

    def __init__(self, config: _StackConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.register_buffer(
            "rope", rope_table(config.max_seq_len, config.head_dim, config.rope_base), persistent=False
        )
        self.cache_len = 0

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype) -> None:
        device = self.norm.weight.device
        for layer in self._blocks():
            cache = KVCache(max_batch_size, max_seq_len, self.config.n_local_heads, self.config.head_dim, dtype)
            layer.attention.kv_cache = cache.to(device)
        self.cache_len = max_seq_len

    def run(
        self, x: Tensor, input_pos: Tensor | None, slots: Slots | None = None, kv_len: int | None = None
    ) -> Tensor:
        # x: (B, S, D) -> final-norm hidden (B, S, D)
        bsz, seqlen, _ = x.shape
        if input_pos is None:
            rope, mask = self.rope[:seqlen].expand(bsz, -1, -1, -1), None
        else:
            input_pos = input_pos.expand(bsz, -1) if input_pos.dim() == 1 else input_pos  # (B, S)
            rope = self.rope[input_pos]  # (B, S, E/2, 2)
            keys = torch.arange(self.cache_len if kv_len is None else kv_len, device=x.device)
            mask = (keys <= input_pos[..., None])[:, None]  # (B, 1, S, L)
        for layer in self._blocks():
            x = layer(x, rope, mask, input_pos, slots, kv_len)
        return self.norm(x)

    def _blocks(self) -> list[TransformerBlock]:
        return [layer for layer in self.layers if isinstance(layer, TransformerBlock)]


class SlowAR(_Stack):
    codebook_offsets: Tensor  # (C, 1): level i's rows start at i * codebook size

    def __init__(self, config: SlowARConfig, num_codebooks: int, codebook_size: int, semantic_range: tuple[int, int]):
        super().__init__(config)
        self.num_codebooks, self.codebook_size = num_codebooks, codebook_size
        self.semantic_begin_id, self.semantic_end_id = semantic_range
        self.embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.codebook_embeddings = nn.Embedding(num_codebooks * codebook_size, config.dim)  # level i: rows i*size..
        self.output = None if config.tie_word_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer(
            "codebook_offsets", torch.arange(num_codebooks)[:, None] * codebook_size, persistent=False
        )  # (C, 1)

    def embed(self, tokens: Tensor) -> Tensor:
        # tokens: (B, 1 + C, S) -> (B, S, D)
        ids, codes = tokens[:, 0], tokens[:, 1:]
        x = self.embeddings(ids)
        audio = self.codebook_embeddings(codes + self.codebook_offsets).sum(dim=1)  # (B, S, D)
        is_semantic = ((ids >= self.semantic_begin_id) & (ids <= self.semantic_end_id))[..., None]
        return torch.where(is_semantic, (x + audio) / math.sqrt(self.num_codebooks + 1), x)

    def forward(
        self, tokens: Tensor, input_pos: Tensor | None = None, slots: Slots | None = None, kv_len: int | None = None
    ) -> Tensor:
        # tokens: (B, 1 + C, S) -> final-norm hidden (B, S, D), the fast AR's seed at each position
        return self.run(self.embed(tokens), input_pos, slots, kv_len)

    def read_kv(self, slot: int, start: int, end: int) -> Tensor:
        """A copy of cache row ``slot``'s keys and values at positions [start, end): (n_layer, 2, K, end - start, E)."""
        caches = [self._cache(layer) for layer in self._blocks()]
        pairs = [torch.stack([c.k_cache[slot, :, start:end], c.v_cache[slot, :, start:end]]) for c in caches]
        return torch.stack(pairs)

    def write_kv(self, slot: int, start: int, kv: Tensor) -> None:
        """Put ``kv`` (n_layer, 2, K, n, E), as from :meth:`read_kv`, at positions [start, start + n) of ``slot``."""
        end = start + kv.shape[3]
        for i, layer in enumerate(self._blocks()):
            cache = self._cache(layer)
            cache.k_cache[slot, :, start:end] = kv[i, 0]
            cache.v_cache[slot, :, start:end] = kv[i, 1]

    @staticmethod
    def _cache(layer: TransformerBlock) -> KVCache:
        assert layer.attention.kv_cache is not None, "setup_caches() first"
        return layer.attention.kv_cache

    def logits(self, hidden: Tensor) -> Tensor:
        # hidden: (..., D) -> (..., V)
        return self.output(hidden) if self.output is not None else F.linear(hidden, self.embeddings.weight)


class FastAR(_Stack):
    def __init__(self, config: FastARConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.dim)  # one table for every codebook level
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, x: Tensor, input_pos: Tensor | None = None) -> Tensor:
        # x: (B, S, D) input vectors (position 0: the slow hidden state; k: embedding of code k-1) -> (B, S, V)
        return self.output(self.run(x, input_pos))


class DualAR(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        semantic_range = (config.semantic_begin_id, config.semantic_end_id)
        self.slow = SlowAR(config.slow, config.num_codebooks, config.codebook_size, semantic_range)
        self.fast = FastAR(config.fast)
        self.max_batch_size = 0

    def setup_caches(self, max_batch_size: int, max_seq_len: int | None = None) -> None:
        """Allocate the KV caches once (slow: max batch x max len; fast: max batch x C). No-op if big enough."""
        max_seq_len = self.config.slow.max_seq_len if max_seq_len is None else max_seq_len
        if not 0 < max_seq_len <= self.config.slow.max_seq_len:
            raise ValueError(f"max_seq_len must be within [1, {self.config.slow.max_seq_len}]")
        if max_batch_size <= self.max_batch_size and max_seq_len <= self.slow.cache_len:
            return
        dtype = self.slow.norm.weight.dtype
        with torch.inference_mode(False):  # plain tensors, usable in and out of inference mode
            self.slow.setup_caches(max_batch_size, max_seq_len, dtype)
            self.fast.setup_caches(max_batch_size, self.config.num_codebooks, dtype)
        self.max_batch_size = max_batch_size

    def init_buffers(self) -> None:
        """Recompute the non-persistent buffers (after ``to_empty``; the loader builds the model on meta)."""
        for stack in (self.slow, self.fast):
            c = stack.config
            stack.rope = rope_table(c.max_seq_len, c.head_dim, c.rope_base).to(stack.rope)
        offsets = torch.arange(self.config.num_codebooks)[:, None] * self.config.codebook_size
        self.slow.codebook_offsets = offsets.to(self.slow.codebook_offsets.device)
