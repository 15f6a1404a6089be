"""Causal building blocks of the S2 Pro codec (ModifiedDAC), each runnable on a whole signal or chunk by chunk.

Streaming contract. Every layer's ``forward(x, state)`` takes ``state: StreamState | None``:

- ``None``: ``x`` is a whole signal that starts at time 0 (zero left context, the reference's padding).
- a ``StreamState``: ``x`` continues the stream that state belongs to. The layer reads its left context from the
  state (zeros on the first chunk) and writes back what the next chunk needs.

Modules hold weights only; all per-stream data lives in the ``StreamState``, so one model serves any number of
concurrent streams. Per layer the state is bounded: a causal conv keeps its last ``(kernel - 1) * dilation``
inputs, a transposed conv its last ``ceil(kernel / stride) - 1`` input frames, an attention layer the keys and
values of its last ``window - 1`` positions.

Tensors are channels-first ``(B, C, T)`` between layers, as in the reference; the transformer works on
``(B, T, C)`` inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.dualar.model import RMSNorm  # the same float32-computed RMSNorm as the language model

__all__ = [
    "CausalConv1d",
    "CausalConvTranspose1d",
    "ConvNeXtBlock",
    "ResidualUnit",
    "Snake1d",
    "StreamState",
    "StreamingModule",
    "StreamingSequential",
    "TransformerConfig",
    "WindowedTransformer",
    "rope_cos_sin",
]


class StreamState:
    """Everything one stream carries between chunks, keyed by the layer that owns it."""

    def __init__(self) -> None:
        self.context: dict[nn.Module, Tensor] = {}  # conv layers: last inputs, (B, C_in, n)
        self.kv: dict[nn.Module, tuple[Tensor, Tensor]] = {}  # attention: (B, H, <= window - 1, head_dim) each
        self.position: dict[nn.Module, int] = {}  # transformers: frames seen so far (the next RoPE position)

    def clear(self) -> None:
        self.context.clear()
        self.kv.clear()
        self.position.clear()

    def numel(self) -> int:
        """Number of tensor elements held (constant once every window is full)."""
        return sum(t.numel() for t in self.context.values()) + sum(k.numel() + v.numel() for k, v in self.kv.values())


class StreamingModule(nn.Module):
    """A layer that follows the streaming contract in the module docstring."""

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class StreamingSequential(nn.Sequential):
    """``nn.Sequential`` (same state-dict keys ``0.``, ``1.``, ...) that hands the stream state to every layer."""

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:  # type: ignore[override]
        for module in self:
            x = module(x, state)
        return x


# --------------------------------------------------------------------------------------------------- activations


class Snake1d(StreamingModule):
    """snake(x) = x + sin(alpha * x)^2 / (alpha + 1e-9), one alpha per channel. Stateless."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


# ------------------------------------------------------------------------------------------------ causal convs


class CausalConv1d(StreamingModule):
    """Conv1d padded on the left only, so output ``t`` sees inputs ``<= t * stride + stride - 1``.

    Whole-signal mode reproduces the reference exactly: ``kernel_eff - stride`` zeros on the left and, for a
    strided conv, the few zeros on the right that make the last window complete. Streaming needs stride 1.
    The weight lives in ``self.conv`` so state-dict keys read ``...conv.weight`` / ``...conv.bias``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups)
        self.stride = stride
        self.kernel_eff = (kernel_size - 1) * dilation + 1
        self.left_pad = self.kernel_eff - stride

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        # x: (B, C_in, T) -> (B, C_out, ceil(T / stride))
        if state is None:
            length = x.shape[-1]
            n_frames = (length - self.kernel_eff + self.left_pad) / self.stride + 1
            ideal_length = (math.ceil(n_frames) - 1) * self.stride + (self.kernel_eff - self.left_pad)
            return self.conv(F.pad(x, (self.left_pad, ideal_length - length)))
        if self.stride != 1:
            raise NotImplementedError("streaming is implemented for stride-1 convolutions only")
        if self.left_pad == 0:
            return self.conv(x)
        context = state.context.get(self)
        if context is None:
            context = x.new_zeros(x.shape[0], x.shape[1], self.left_pad)
        x = torch.cat([context, x], dim=-1)  # (B, C_in, left_pad + T)
        state.context[self] = x[..., x.shape[-1] - self.left_pad :].clone()
        return self.conv(x)


class CausalConvTranspose1d(StreamingModule):
    """ConvTranspose1d whose trailing ``kernel - stride`` samples are cut: ``T`` frames -> ``T * stride`` samples.

    Output frame ``t`` depends on input frames ``t - c .. t`` with ``c = ceil(kernel / stride) - 1``; the stream
    state keeps those ``c`` input frames (so the overlap-add is recomputed rather than carried as partial sums).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.stride = stride
        self.trim = kernel_size - stride
        self.context_frames = -(-kernel_size // stride) - 1

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        # x: (B, C_in, T) -> (B, C_out, T * stride)
        length = x.shape[-1] * self.stride
        if state is None or self.context_frames == 0:
            return self.conv(x)[..., :length]
        context = state.context.get(self)
        if context is None:
            context = x.new_zeros(x.shape[0], x.shape[1], self.context_frames)
        x = torch.cat([context, x], dim=-1)  # (B, C_in, c + T)
        state.context[self] = x[..., x.shape[-1] - self.context_frames :].clone()
        start = self.context_frames * self.stride
        return self.conv(x)[..., start : start + length]


# ---------------------------------------------------------------------------------------------- composite blocks


class ResidualUnit(StreamingModule):
    """x + conv1x1(snake(conv7_dilated(snake(x)))), all causal (same length in and out)."""

    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = StreamingSequential(
            Snake1d(dim),
            CausalConv1d(dim, dim, 7, dilation=dilation),
            Snake1d(dim),
            CausalConv1d(dim, dim, 1),
        )

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        return x + self.block(x, state)


class ConvNeXtBlock(StreamingModule):
    """x + gamma * pw2(gelu(pw1(layernorm(causal_depthwise_conv7(x))))) — the quantizer's (up/down)sampling stage."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.dwconv = CausalConv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.pwconv2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        y = self.dwconv(x, state).transpose(1, 2)  # (B, T, C)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


# -------------------------------------------------------------------------------------------------- transformer


@dataclass(frozen=True)
class TransformerConfig:
    """A causal transformer whose attention sees the last ``window`` positions (the query's own included)."""

    n_layer: int
    n_head: int
    dim: int
    head_dim: int
    intermediate_size: int
    window: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    input_dim: int | None = None  # channels outside; a Linear maps them to/from ``dim`` when they differ

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "dim", "head_dim", "intermediate_size", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"TransformerConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rope_base > 0 and self.norm_eps > 0):
            raise ValueError("TransformerConfig.rope_base and norm_eps must be positive")
        if self.input_dim is not None and self.input_dim < 1:
            raise ValueError(f"TransformerConfig.input_dim must be positive, got {self.input_dim}")


def rope_cos_sin(start: int, length: int, head_dim: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of RoPE angles for positions ``start .. start + length - 1``: two (length, head_dim // 2) float32.

    Rounded through bfloat16, as the reference's table is (it stores it in bf16 even in float32 runs).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(start, start + length, device=device), inv_freq)  # (length, head_dim // 2)
    cis = torch.polar(torch.ones_like(angles), angles)
    return cis.real.to(torch.bfloat16).float(), cis.imag.to(torch.bfloat16).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) in float32. x: (B, T, H, D); cos, sin: (T, D // 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(3).type_as(x)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def window_mask(n_query: int, n_key: int, window: int, device: torch.device) -> Tensor:
    """(n_query, n_key) bool: the queries are the last ``n_query`` of the ``n_key`` consecutive key positions."""
    q_pos = torch.arange(n_key - n_query, n_key, device=device)[:, None]
    k_pos = torch.arange(n_key, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.window = config.n_head, config.head_dim, config.window
        self.wqkv = nn.Linear(config.dim, 3 * config.n_head * config.head_dim, bias=False)  # rows q | k | v
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, state: StreamState | None) -> Tensor:
        batch, n_new, _ = x.shape  # x: (B, T, dim)
        q, k, v = self.wqkv(x).split(self.n_head * self.head_dim, dim=-1)
        q = apply_rope(q.view(batch, n_new, self.n_head, self.head_dim), cos, sin).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(k.view(batch, n_new, self.n_head, self.head_dim), cos, sin).transpose(1, 2)
        v = v.view(batch, n_new, self.n_head, self.head_dim).transpose(1, 2)
        if state is not None:
            cached = state.kv.get(self)
            if cached is not None:
                k = torch.cat([cached[0], k], dim=2)  # (B, H, L + T, D)
                v = torch.cat([cached[1], v], dim=2)
            keep = min(k.shape[2], self.window - 1)
            start = k.shape[2] - keep
            state.kv[self] = (k[:, :, start:].clone(), v[:, :, start:].clone())
        mask = window_mask(n_new, k.shape[2], self.window, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(batch, n_new, self.n_head * self.head_dim))


class TransformerBlock(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.intermediate_size)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention_layer_scale = LayerScale(config.dim)
        self.ffn_layer_scale = LayerScale(config.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, state: StreamState | None) -> Tensor:
        h = x + self.attention_layer_scale(self.attention(self.attention_norm(x), cos, sin, state))
        return h + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(h)))


class WindowedTransformer(StreamingModule):
    """Pre-norm causal transformer with window-limited attention and RoPE on absolute positions; channels-first I/O.

    A long whole signal is processed in blocks of ``max_block`` positions through a private stream state, which
    bounds the attention's memory at ``max_block * (max_block + window)`` scores per head.
    """

    max_block = 1024

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        outer = config.input_dim if config.input_dim is not None else config.dim
        self.input_proj = nn.Linear(outer, config.dim) if outer != config.dim else None
        self.output_proj = nn.Linear(config.dim, outer) if outer != config.dim else None

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        # x: (B, C, T) -> (B, C, T)
        h = x.transpose(1, 2)  # (B, T, C)
        if self.input_proj is not None:
            h = self.input_proj(h)
        if state is None and h.shape[1] > self.max_block:
            state = StreamState()
        if state is None:
            h = self._run(h, 0, None)
        else:
            blocks = []
            for block in h.split(self.max_block, dim=1):
                position = state.position.get(self, 0)
                blocks.append(self._run(block, position, state))
                state.position[self] = position + block.shape[1]
            h = torch.cat(blocks, dim=1) if len(blocks) != 1 else blocks[0]
        if self.output_proj is not None:
            h = self.output_proj(h)
        return h.transpose(1, 2)

    def _run(self, h: Tensor, position: int, state: StreamState | None) -> Tensor:
        cos, sin = rope_cos_sin(position, h.shape[1], self.config.head_dim, self.config.rope_base, h.device)
        for layer in self.layers:
            h = layer(h, cos, sin, state)
        return self.norm(h)
