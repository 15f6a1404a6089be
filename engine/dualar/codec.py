"""The S2 Pro codec (ModifiedDAC): 44.1 kHz mono audio <-> (10, T) codes, one frame per 2048 samples.

    encode: audio (n,) -> pad right to a multiple of 2048 -> Encoder (causal convs, /512) -> latent (D, 4T)
            -> 2 x (causal conv /2 + ConvNeXt) -> pre_module (windowed transformer) -> (D, T)
            -> semantic VQ (code 0) -> residual RVQ on what is left (codes 1..9)
    decode: codes (10, T) -> sum of the codebook vectors (each projected 8 -> D) -> post_module (causal windowed
            transformer, 128 frames) -> 2 x (causal transposed conv x2 + ConvNeXt) -> Decoder (causal conv,
            4 x [snake, causal transposed conv, 3 residual units], snake, conv, tanh) -> audio (T * 2048,)

Everything on the decode path is causal, so :class:`StreamingDecoder` decodes chunk after chunk with an explicit
per-stream state and gives the samples of a whole decode (see ``codec_layers`` for the contract).

The rest of the engine uses :func:`load_codec` and the :class:`Codec` it returns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.dualar.codec_layers import (
    CausalConv1d,
    CausalConvTranspose1d,
    ConvNeXtBlock,
    ResidualUnit,
    Snake1d,
    StreamingModule,
    StreamingSequential,
    StreamState,
    TransformerConfig,
    WindowedTransformer,
)

__all__ = [
    "Codec",
    "CodecConfig",
    "CodecLoadError",
    "ModifiedDAC",
    "StreamingDecoder",
    "TransformerConfig",
    "build_codec_model",
    "load_codec",
    "load_codec_state_dict",
]

CONFIG_FILE_NAME = "codec_config.json"  # looked for next to codec.pth when no config is given


# ------------------------------------------------------------------------------------------------------ config


def _positive_ints(name: str, values: tuple[int, ...], length: int | None = None) -> None:
    if length is not None and len(values) != length:
        raise ValueError(f"CodecConfig.{name} must have {length} entries, got {len(values)}")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"CodecConfig.{name} must hold positive ints, got {values!r}")


@dataclass(frozen=True)
class CodecConfig:
    """Hyperparameters of a ModifiedDAC codec. ``tiny()`` is the test fixture, ``s2pro()`` the released model."""

    sample_rate: int = 44100
    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    latent_dim: int = 1024
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    # Transformer after the strided conv of each encoder block (0 = none); n_head = block dim // head_dim.
    encoder_transformer_layers: tuple[int, ...] = (0, 0, 0, 4)
    encoder_transformer_head_dim: int = 64
    encoder_transformer_window: int = 512
    encoder_transformer_rope_base: float = 10000.0
    encoder_transformer_norm_eps: float = 1e-5
    # Quantizer
    semantic_codebook_size: int = 4096
    n_residual_codebooks: int = 9
    residual_codebook_size: int = 1024
    codebook_dim: int = 8
    downsample_factor: tuple[int, ...] = (2, 2)
    pre_module: TransformerConfig = field(
        default_factory=lambda: TransformerConfig(
            n_layer=8, n_head=16, dim=1024, head_dim=64, intermediate_size=3072, window=128
        )
    )
    post_module: TransformerConfig = field(
        default_factory=lambda: TransformerConfig(
            n_layer=8, n_head=16, dim=1024, head_dim=64, intermediate_size=3072, window=128
        )
    )

    def __post_init__(self) -> None:
        for name in ("encoder_rates", "decoder_rates", "encoder_transformer_layers", "downsample_factor"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in (
            "sample_rate",
            "encoder_dim",
            "latent_dim",
            "decoder_dim",
            "encoder_transformer_head_dim",
            "encoder_transformer_window",
            "semantic_codebook_size",
            "n_residual_codebooks",
            "residual_codebook_size",
            "codebook_dim",
        ):
            _positive_ints(name, (getattr(self, name),))
        if not (self.encoder_transformer_rope_base > 0 and self.encoder_transformer_norm_eps > 0):
            raise ValueError("CodecConfig.encoder_transformer_rope_base and _norm_eps must be positive")
        _positive_ints("encoder_rates", self.encoder_rates)
        _positive_ints("decoder_rates", self.decoder_rates)
        _positive_ints("downsample_factor", self.downsample_factor)
        if len(self.encoder_transformer_layers) != len(self.encoder_rates) or any(
            not isinstance(n, int) or n < 0 for n in self.encoder_transformer_layers
        ):
            raise ValueError("CodecConfig.encoder_transformer_layers needs one count >= 0 per encoder rate")
        if math.prod(self.encoder_rates) != math.prod(self.decoder_rates):
            raise ValueError(
                f"encoder and decoder must have the same hop: prod{self.encoder_rates} != prod{self.decoder_rates}"
            )
        if self.decoder_dim % (2 ** len(self.decoder_rates)):
            raise ValueError(f"decoder_dim {self.decoder_dim} must halve {len(self.decoder_rates)} times")
        top = self.encoder_dim * 2 ** len(self.encoder_rates)
        if any(self.encoder_transformer_layers) and top % self.encoder_transformer_head_dim:
            raise ValueError(f"encoder block dim {top} is not a multiple of {self.encoder_transformer_head_dim}")
        for name in ("pre_module", "post_module"):
            module: TransformerConfig = getattr(self, name)
            if (module.input_dim or module.dim) != self.latent_dim:
                channels = module.input_dim or module.dim
                raise ValueError(f"CodecConfig.{name} works on {channels} channels, not latent_dim {self.latent_dim}")
        if self.semantic_codebook_size > 32767 or self.residual_codebook_size > 32767:
            raise ValueError("codebook sizes must fit int16 codes")

    @property
    def hop_length(self) -> int:
        """Audio samples per encoder latent step (512)."""
        return math.prod(self.encoder_rates)

    @property
    def frame_samples(self) -> int:
        """Audio samples per code frame (2048)."""
        return self.hop_length * math.prod(self.downsample_factor)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_samples

    @property
    def n_codebooks(self) -> int:
        return 1 + self.n_residual_codebooks

    def encoder_block_dims(self) -> list[int]:
        return [self.encoder_dim * 2 ** (i + 1) for i in range(len(self.encoder_rates))]

    @classmethod
    def s2pro(cls) -> CodecConfig:
        """The released Fish Audio S2 Pro codec (fish-speech ``modded_dac_vq.yaml``)."""
        return cls()

    @classmethod
    def tiny(cls) -> CodecConfig:
        """The randomly initialised test codec of ``fixtures/s2pro-tiny`` (same as its ``codec_config.json``)."""
        module = TransformerConfig(n_layer=1, n_head=2, dim=64, head_dim=32, intermediate_size=192, window=128)
        return cls(
            encoder_dim=4,
            latent_dim=64,
            decoder_dim=64,
            encoder_transformer_layers=(0, 0, 0, 1),
            semantic_codebook_size=64,
            residual_codebook_size=32,
            pre_module=module,
            post_module=module,
        )

    @classmethod
    def small(cls) -> CodecConfig:
        """A CPU-sized codec for benchmarks (random weights): the real layout, rates and codebook sizes, with a
        quarter of the channels and 2-layer pre/post transformers (about 1/30 of the real parameters)."""
        module = TransformerConfig(n_layer=2, n_head=4, dim=256, head_dim=64, intermediate_size=768, window=128)
        return cls(
            encoder_dim=16,
            latent_dim=256,
            decoder_dim=384,
            encoder_transformer_layers=(0, 0, 0, 1),
            pre_module=module,
            post_module=module,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> CodecConfig:
        """Read a ``codec_config.json`` in the fixture's format (see :meth:`from_dict`)."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CodecConfig:
        """Build from the fixture's layout: top-level codec values, ``encoder_transformer`` and ``quantizer`` with
        its ``pre_and_post_module``. Missing values take the S2 Pro defaults; unknown keys are ignored."""
        try:
            base = cls()
            enc_t = dict(data.get("encoder_transformer", {}))
            quant = dict(data.get("quantizer", {}))
            module_data = dict(quant.get("pre_and_post_module", {}))
            default_module = base.post_module
            module = TransformerConfig(
                n_layer=int(module_data.get("n_layer", default_module.n_layer)),
                n_head=int(module_data.get("n_head", default_module.n_head)),
                dim=int(module_data.get("dim", default_module.dim)),
                head_dim=int(module_data.get("head_dim", default_module.head_dim)),
                intermediate_size=int(module_data.get("intermediate_size", default_module.intermediate_size)),
                window=int(module_data.get("window_size", default_module.window)),
                rope_base=float(module_data.get("rope_base", default_module.rope_base)),
                norm_eps=float(module_data.get("norm_eps", default_module.norm_eps)),
            )
            if module_data.get("causal", True) is not True:
                raise ValueError("only causal pre/post modules are supported")
            config = cls(
                sample_rate=int(data.get("sample_rate", base.sample_rate)),
                encoder_dim=int(data.get("encoder_dim", base.encoder_dim)),
                encoder_rates=tuple(int(r) for r in data.get("encoder_rates", base.encoder_rates)),
                latent_dim=int(data.get("latent_dim", base.latent_dim)),
                decoder_dim=int(data.get("decoder_dim", base.decoder_dim)),
                decoder_rates=tuple(int(r) for r in data.get("decoder_rates", base.decoder_rates)),
                encoder_transformer_layers=tuple(
                    int(n) for n in data.get("encoder_transformer_layers", base.encoder_transformer_layers)
                ),
                encoder_transformer_head_dim=int(enc_t.get("head_dim", base.encoder_transformer_head_dim)),
                encoder_transformer_window=int(enc_t.get("window", base.encoder_transformer_window)),
                encoder_transformer_rope_base=float(enc_t.get("rope_base", base.encoder_transformer_rope_base)),
                encoder_transformer_norm_eps=float(enc_t.get("norm_eps", base.encoder_transformer_norm_eps)),
                semantic_codebook_size=int(quant.get("semantic_codebook_size", base.semantic_codebook_size)),
                n_residual_codebooks=int(quant.get("n_residual_codebooks", base.n_residual_codebooks)),
                residual_codebook_size=int(quant.get("residual_codebook_size", base.residual_codebook_size)),
                codebook_dim=int(quant.get("codebook_dim", base.codebook_dim)),
                downsample_factor=tuple(int(f) for f in quant.get("downsample_factor", base.downsample_factor)),
                pre_module=module,
                post_module=module,
            )
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"malformed codec config: {exc}") from exc
        # Cross-checks against values the file states redundantly.
        if "latent_dim" in data and "input_dim" in quant and int(quant["input_dim"]) != config.latent_dim:
            raise ValueError("quantizer.input_dim differs from latent_dim")
        if "hop_length" in data and int(data["hop_length"]) != config.hop_length:
            raise ValueError(f"hop_length {data['hop_length']} != prod(encoder_rates) {config.hop_length}")
        if "frame_length" in quant and int(quant["frame_length"]) != config.frame_samples:
            raise ValueError(f"frame_length {quant['frame_length']} != {config.frame_samples}")
        return config


# ------------------------------------------------------------------------------------------------------ network


class EncoderBlock(nn.Module):
    """3 residual units at dim/2, snake, strided causal conv dim/2 -> dim (/stride), optional transformer."""

    def __init__(self, dim: int, stride: int, transformer: TransformerConfig | None) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            ResidualUnit(dim // 2, dilation=1),
            ResidualUnit(dim // 2, dilation=3),
            ResidualUnit(dim // 2, dilation=9),
            Snake1d(dim // 2),
            CausalConv1d(dim // 2, dim, 2 * stride, stride=stride),
        ]
        if transformer is not None:
            layers.append(WindowedTransformer(transformer))
        self.block = StreamingSequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Encoder(nn.Module):
    """audio (B, 1, n) -> latent (B, latent_dim, n / hop). Causal; used for whole signals only."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(1, config.encoder_dim, 7)]
        for dim, stride, n_layer in zip(
            config.encoder_block_dims(), config.encoder_rates, config.encoder_transformer_layers, strict=True
        ):
            transformer = None
            if n_layer:
                transformer = TransformerConfig(
                    n_layer=n_layer,
                    n_head=dim // config.encoder_transformer_head_dim,
                    dim=dim,
                    head_dim=config.encoder_transformer_head_dim,
                    intermediate_size=3 * dim,
                    window=config.encoder_transformer_window,
                    rope_base=config.encoder_transformer_rope_base,
                    norm_eps=config.encoder_transformer_norm_eps,
                )
            layers.append(EncoderBlock(dim, stride, transformer))
        top = config.encoder_block_dims()[-1]
        layers += [Snake1d(top), CausalConv1d(top, config.latent_dim, 3)]
        self.block = nn.Sequential(*layers)

    def forward(self, audio: Tensor) -> Tensor:
        return self.block(audio)


class DecoderBlock(StreamingModule):
    """snake, causal transposed conv in -> out (x stride), 3 residual units."""

    def __init__(self, in_dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.block = StreamingSequential(
            Snake1d(in_dim),
            CausalConvTranspose1d(in_dim, out_dim, 2 * stride, stride=stride),
            ResidualUnit(out_dim, dilation=1),
            ResidualUnit(out_dim, dilation=3),
            ResidualUnit(out_dim, dilation=9),
        )

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        return self.block(x, state)


class Decoder(StreamingModule):
    """latent (B, latent_dim, L) -> audio (B, 1, L * hop) in [-1, 1]."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        dim = config.decoder_dim
        layers: list[nn.Module] = [CausalConv1d(config.latent_dim, dim, 7)]
        for i, stride in enumerate(config.decoder_rates):
            layers.append(DecoderBlock(dim // 2**i, dim // 2 ** (i + 1), stride))
        out_dim = dim // 2 ** len(config.decoder_rates)
        layers += [Snake1d(out_dim), CausalConv1d(out_dim, 1, 7)]
        self.model = StreamingSequential(*layers)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        return torch.tanh(self.model(x, state))


class VectorQuantizer(nn.Module):
    """One codebook: project D -> codebook_dim, nearest entry by cosine distance, look up, project back to D."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.in_proj = nn.Conv1d(input_dim, codebook_dim, 1)
        self.out_proj = nn.Conv1d(codebook_dim, input_dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, D, T) -> (quantized z (B, D, T), codes (B, T))."""
        z_e = self.in_proj(z)  # (B, d, T)
        batch, dim, _ = z_e.shape
        encodings = F.normalize(z_e.transpose(1, 2).reshape(-1, dim).float())  # (B*T, d), float32 whatever the model
        codebook = F.normalize(self.codebook.weight.float())  # (N, d)
        dist = (
            encodings.pow(2).sum(1, keepdim=True)
            - 2 * encodings @ codebook.t()
            + codebook.pow(2).sum(1, keepdim=True).t()
        )  # (B*T, N)
        codes = (-dist).max(1).indices.view(batch, -1)  # (B, T)
        z_q = self.codebook.weight[codes].transpose(1, 2)  # (B, d, T)
        return self.out_proj(z_e + (z_q - z_e)), codes  # the reference's straight-through form, same rounding

    def lookup(self, codes: Tensor) -> Tensor:
        """codes (B, T) -> (B, D, T)."""
        return self.out_proj(F.embedding(codes, self.codebook.weight).transpose(1, 2))


class ResidualQuantizer(nn.Module):
    def __init__(self, input_dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(
            VectorQuantizer(input_dim, codebook_size, codebook_dim) for _ in range(n_codebooks)
        )

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, D, T) -> (sum of the levels (B, D, T), codes (B, N, T)); each level quantizes what is left."""
        z_q: Tensor | float = 0.0
        residual = z
        codes = []
        for quantizer in self.quantizers:
            z_i, codes_i = quantizer.quantize(residual)
            z_q = z_q + z_i
            residual = residual - z_i
            codes.append(codes_i)
        assert isinstance(z_q, Tensor)
        return z_q, torch.stack(codes, dim=1)

    def lookup(self, codes: Tensor) -> Tensor:
        """codes (B, N, T) -> (B, D, T), the levels summed in order."""
        z_q: Tensor | float = 0.0
        for i, quantizer in enumerate(self.quantizers):
            z_q = z_q + quantizer.lookup(codes[:, i])
        assert isinstance(z_q, Tensor)
        return z_q


class Quantizer(nn.Module):
    """The reference's DownsampleResidualVectorQuantize (inference half): codes at 1/4 the latent rate."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        dim = config.latent_dim
        self.semantic_codebook_size = config.semantic_codebook_size
        self.residual_codebook_size = config.residual_codebook_size
        self.semantic_quantizer = ResidualQuantizer(dim, 1, config.semantic_codebook_size, config.codebook_dim)
        self.quantizer = ResidualQuantizer(
            dim, config.n_residual_codebooks, config.residual_codebook_size, config.codebook_dim
        )
        self.downsample = StreamingSequential(
            *(
                StreamingSequential(CausalConv1d(dim, dim, f, stride=f), ConvNeXtBlock(dim))
                for f in config.downsample_factor
            )
        )
        self.upsample = StreamingSequential(
            *(
                StreamingSequential(CausalConvTranspose1d(dim, dim, f, stride=f), ConvNeXtBlock(dim))
                for f in reversed(config.downsample_factor)
            )
        )
        self.pre_module = WindowedTransformer(config.pre_module)
        self.post_module = WindowedTransformer(config.post_module)

    def encode(self, latent: Tensor) -> Tensor:
        """latent (B, D, 4T) -> codes (B, 1 + n_residual, T) int64."""
        z = self.pre_module(self.downsample(latent))  # (B, D, T)
        z_semantic, semantic_codes = self.semantic_quantizer.quantize(z)
        _, residual_codes = self.quantizer.quantize(z - z_semantic)
        return torch.cat([semantic_codes, residual_codes], dim=1)

    def embed(self, codes: Tensor) -> Tensor:
        """codes (B, 1 + n_residual, T) -> summed codebook vectors (B, D, T); too-large codes clamp as in the
        reference."""
        semantic = codes[:, :1].clamp(max=self.semantic_codebook_size - 1)
        residual = codes[:, 1:].clamp(max=self.residual_codebook_size - 1)
        return self.semantic_quantizer.lookup(semantic) + self.quantizer.lookup(residual)

    def decode(self, codes: Tensor, state: StreamState | None = None) -> Tensor:
        """codes (B, 1 + n_residual, T) -> decoder input z_q (B, D, 4T)."""
        return self.upsample(self.post_module(self.embed(codes), state), state)


class ModifiedDAC(nn.Module):
    """The codec network. Parameter names follow the reference checkpoint (weight norm folded)."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = Quantizer(config)
        self.decoder = Decoder(config)

    def encode(self, audio: Tensor) -> Tensor:
        """audio (B, 1, n) -> codes (B, 1 + n_residual, ceil(n / frame_samples)); pads right with zeros."""
        frame = self.config.frame_samples
        pad = -audio.shape[-1] % frame
        return self.quantizer.encode(self.encoder(F.pad(audio, (0, pad))))

    def decode(self, codes: Tensor, state: StreamState | None = None) -> Tensor:
        """codes (B, 1 + n_residual, T) -> audio (B, 1, T * frame_samples). With a state: the next chunk."""
        return self.decoder(self.quantizer.decode(codes, state), state)


# ------------------------------------------------------------------------------------------------------ loading


class CodecLoadError(ValueError):
    """A checkpoint does not fit the codec config: names the missing and unexpected keys and shape mismatches."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []  # (key, shape in checkpoint, shape expected)

        def listing(keys: list[str]) -> str:
            shown = ", ".join(keys[:20])
            return shown + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")

        parts = [message]
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {listing(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {listing(self.unexpected)}")
        if self.mismatched:
            parts.append(
                f"shape mismatches ({len(self.mismatched)}): "
                + listing([f"{k} {tuple(got)} vs expected {tuple(want)}" for k, got, want in self.mismatched])
            )
        super().__init__("\n  ".join(parts))


_WN_SUFFIXES = (
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),  # torch.nn.utils.parametrizations
    (".weight_g", ".weight_v"),  # legacy torch.nn.utils.weight_norm
)


def _fold_weight_norm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace every (g, v) weight-norm pair by ``weight = g * v / ||v||`` (norm over all but dim 0)."""
    out: dict[str, Tensor] = {}
    pending: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        for g_suffix, v_suffix in _WN_SUFFIXES:
            if key.endswith(g_suffix) or key.endswith(v_suffix):
                suffix = g_suffix if key.endswith(g_suffix) else v_suffix
                base = key[: -len(suffix)]
                pending.setdefault(base, {})["g" if suffix == g_suffix else "v"] = value
                break
        else:
            out[key] = value
    for base, pair in pending.items():
        if set(pair) != {"g", "v"}:
            raise CodecLoadError(f"weight-norm pair of {base}.weight is incomplete", missing=[base + ".weight"])
        g, v = pair["g"].float(), pair["v"].float()
        if g.dim() != v.dim() or g.shape[0] != v.shape[0]:
            raise CodecLoadError(
                "weight-norm magnitude does not fit its direction",
                mismatched=[(base + ".weight_g", tuple(g.shape), (v.shape[0],) + (1,) * (v.dim() - 1))],
            )
        out[base + ".weight"] = torch._weight_norm(v, g, 0).to(pair["v"].dtype)
    return out


def load_codec_state_dict(source: str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
    """Read a codec checkpoint (path or loaded mapping) into plain parameter names with weight norm folded.

    Accepts a bare state dict, one wrapped in ``state_dict``, and keys prefixed ``generator.`` (then other
    top-level parts of a training checkpoint, such as ``discriminator.``, are dropped).
    """
    if isinstance(source, Mapping):
        raw: Any = source
    else:
        raw = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise CodecLoadError("not a codec state dict (expected a mapping of parameter names to tensors)")
    state = {str(k): v for k, v in raw.items()}
    if any(k.startswith("generator.") for k in state):
        state = {k[len("generator.") :]: v for k, v in state.items() if k.startswith("generator.")}
    return _fold_weight_norm(state)


def _check_state_dict(model: nn.Module, state: Mapping[str, Tensor], strict: bool) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected) if strict else []
    mismatched = [
        (k, tuple(state[k].shape), shape)
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if missing or unexpected or mismatched:
        raise CodecLoadError(
            "codec checkpoint does not match the codec config",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )


def build_codec_model(
    state: Mapping[str, Tensor],
    config: CodecConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    strict: bool = True,
) -> ModifiedDAC:
    """A ModifiedDAC for ``config`` holding the (already folded) ``state``, in eval mode on ``device``/``dtype``."""
    with torch.device("meta"):
        model = ModifiedDAC(config)
    _check_state_dict(model, state, strict)
    expected = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ streaming


class StreamingDecoder:
    """Decodes one stream of codes chunk by chunk; the concatenated output equals a whole decode.

    The state holds each causal conv's left context, each transposed conv's last input frame, and the
    post-module's keys/values over its last ``window - 1`` frames, so it stays bounded however long the stream.
    """

    def __init__(self, model: ModifiedDAC) -> None:
        self.model = model
        self.state = StreamState()
        self.frames_decoded = 0

    @property
    def frame_samples(self) -> int:
        return self.model.config.frame_samples

    def reset(self) -> None:
        """Start a new stream (forget all context)."""
        self.state.clear()
        self.frames_decoded = 0

    @torch.inference_mode()
    def decode_tensor(self, codes: Tensor) -> Tensor:
        """codes (n_codebooks, k) -> audio (k * frame_samples,) on the model's device, in the model's dtype."""
        n_codebooks = self.model.config.n_codebooks
        if codes.dim() != 2 or codes.shape[0] != n_codebooks:
            raise ValueError(f"expected codes of shape ({n_codebooks}, k), got {tuple(codes.shape)}")
        param = next(self.model.parameters())
        if codes.shape[1] == 0:
            return torch.zeros(0, device=param.device, dtype=param.dtype)
        codes = codes.to(device=param.device, dtype=torch.long)[None]  # (1, n_codebooks, k)
        audio = self.model.decode(codes, self.state)  # (1, 1, k * frame_samples)
        self.frames_decoded += codes.shape[-1]
        return audio[0, 0]

    def decode(self, codes: np.ndarray | Tensor) -> np.ndarray:
        """codes (n_codebooks, k) integers -> float32 audio (k * frame_samples,) at the codec's sample rate."""
        tensor = _codes_tensor(codes, self.model.config)
        return self.decode_tensor(tensor).float().cpu().numpy()


# ------------------------------------------------------------------------------------------------------ public API


def _codes_tensor(codes: np.ndarray | Tensor, config: CodecConfig) -> Tensor:
    tensor = torch.as_tensor(codes)
    if tensor.dim() != 2 or tensor.shape[0] != config.n_codebooks:
        raise ValueError(f"expected codes of shape ({config.n_codebooks}, T), got {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"codes must be integers, got {tensor.dtype}")
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError("codes must be non-negative")
    return tensor


class Codec:
    """A loaded codec: numpy in, numpy out, for the rest of the engine.

    ``decode`` of more than ``max_frames_per_pass`` frames runs through a streaming decoder in passes of that
    many frames, which bounds memory and gives the same samples.
    """

    def __init__(self, model: ModifiedDAC, *, max_frames_per_pass: int = 256) -> None:
        if max_frames_per_pass < 1:
            raise ValueError("max_frames_per_pass must be >= 1")
        self.model = model
        self.config = model.config
        self.max_frames_per_pass = max_frames_per_pass

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_samples(self) -> int:
        return self.config.frame_samples

    @property
    def n_codebooks(self) -> int:
        return self.config.n_codebooks

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def encode(self, wave: np.ndarray | Tensor, sample_rate: int) -> np.ndarray:
        """Mono audio (n,) at ``sample_rate`` -> codes (n_codebooks, ceil(n' / frame_samples)) int16, where n' is
        the length after resampling to the codec's rate. Float audio in [-1, 1]; int16 PCM is scaled by 1/32768."""
        if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        array = wave.detach().cpu().numpy() if isinstance(wave, Tensor) else np.asarray(wave)
        if array.ndim != 1:
            raise ValueError(f"expected mono audio of shape (n,), got {array.shape}")
        if array.dtype == np.int16:
            array = array.astype(np.float32) / 32768.0
        elif not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"audio must be float or int16, got {array.dtype}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if sample_rate != self.sample_rate and array.size:
            import soxr  # only for encoding audio at another rate: the GPU check's image has no soxr, and needs none

            array = np.ascontiguousarray(soxr.resample(array, sample_rate, self.sample_rate), dtype=np.float32)
        if array.size == 0:
            return np.zeros((self.n_codebooks, 0), dtype=np.int16)
        audio = torch.from_numpy(array).to(device=self.device, dtype=self.dtype)[None, None]  # (1, 1, n)
        codes = self.model.encode(audio)[0]  # (n_codebooks, T)
        return codes.cpu().numpy().astype(np.int16)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray | Tensor) -> np.ndarray:
        """codes (n_codebooks, T) -> float32 audio (T * frame_samples,) at ``sample_rate``."""
        tensor = _codes_tensor(codes, self.config)
        if tensor.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        if tensor.shape[1] <= self.max_frames_per_pass:
            batch = tensor.to(device=self.device, dtype=torch.long)[None]
            return self.model.decode(batch)[0, 0].float().cpu().numpy()
        stream = self.stream()
        parts = [stream.decode_tensor(chunk).float().cpu() for chunk in tensor.split(self.max_frames_per_pass, 1)]
        return torch.cat(parts).numpy()

    def stream(self) -> StreamingDecoder:
        """A fresh streaming decoder (its own state; the model's weights are shared)."""
        return StreamingDecoder(self.model)


def load_codec(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: CodecConfig | str | Path | None = None,
    *,
    strict: bool = True,
) -> Codec:
    """Load ``codec.pth`` into a :class:`Codec`.

    ``config``: a CodecConfig, or a path to a ``codec_config.json``; by default the ``codec_config.json`` next to
    the checkpoint if there is one, else the S2 Pro values. ``strict=False`` ignores unexpected keys (missing keys
    and shape mismatches always raise :class:`CodecLoadError`).
    """
    path = Path(path)
    if config is None:
        sibling = path.parent / CONFIG_FILE_NAME
        config = CodecConfig.from_json(sibling) if sibling.is_file() else CodecConfig.s2pro()
    elif not isinstance(config, CodecConfig):
        config = CodecConfig.from_json(config)
    state = load_codec_state_dict(path)
    return Codec(build_codec_model(state, config, device=device, dtype=dtype, strict=strict))
