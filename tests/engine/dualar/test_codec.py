"""The S2 Pro codec against the reference's golden outputs for the tiny fixture codec, and streaming == whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.dualar.codec import (
    Codec,
    CodecConfig,
    CodecLoadError,
    ModifiedDAC,
    TransformerConfig,
    build_codec_model,
    load_codec,
    load_codec_state_dict,
)
from engine.dualar.codec_layers import CausalConv1d, CausalConvTranspose1d, StreamState
from tests.engine.dualar import FIXTURES



STREAM_TOL = 2e-5  # chunk-by-chunk vs whole decode (measured: ~6e-6)
GOLDEN_AUDIO_TOL = 1e-5  # vs the reference (measured: 9.7e-7 decode, 2.6e-6 recon)


@pytest.fixture(scope="module")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="module")
def codec(fixtures: Path) -> Codec:
    return load_codec(fixtures / "codec" / "codec.pth")


@pytest.fixture(scope="module")
def raw_state(fixtures: Path) -> dict[str, torch.Tensor]:
    state = torch.load(fixtures / "codec" / "codec.pth", map_location="cpu", weights_only=True)
    assert isinstance(state, dict)
    return state


def _random_codes(config: CodecConfig, n_frames: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    semantic = rng.integers(0, config.semantic_codebook_size, (1, n_frames))
    residual = rng.integers(0, config.residual_codebook_size, (config.n_residual_codebooks, n_frames))
    return np.concatenate([semantic, residual]).astype(np.int64)  # (10, n_frames)


def _whole_decode(codec: Codec, codes: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return codec.model.decode(torch.from_numpy(codes)[None])[0, 0].numpy()


# ------------------------------------------------------------------------------------------------------ config


def test_tiny_preset_equals_fixture_json(fixtures: Path) -> None:
    config = CodecConfig.from_json(fixtures / "codec" / "codec_config.json")
    assert config == CodecConfig.tiny()
    assert (config.sample_rate, config.hop_length, config.frame_samples, config.n_codebooks) == (44100, 512, 2048, 10)


def test_s2pro_preset_matches_the_real_values_listed_in_the_fixture(fixtures: Path) -> None:
    real = json.loads((fixtures / "codec" / "codec_config.json").read_text())["real_s2pro_values"]
    config = CodecConfig.s2pro()
    assert config.latent_dim == real["latent_dim"]
    assert config.encoder_dim == real["encoder_dim"]
    assert config.decoder_dim == real["decoder_dim"]
    assert list(config.encoder_transformer_layers) == real["encoder_transformer_layers"]
    assert config.semantic_codebook_size == real["semantic_codebook_size"]
    assert config.residual_codebook_size == real["residual_codebook_size"]
    module = real["pre_and_post_module"]
    for m in (config.pre_module, config.post_module):
        assert (m.n_layer, m.n_head, m.dim, m.head_dim, m.intermediate_size, m.window) == (
            module["n_layer"],
            module["n_head"],
            module["dim"],
            module["head_dim"],
            module["intermediate_size"],
            128,
        )
    assert config.frame_samples == 2048


def test_s2pro_parameter_count_is_the_published_one() -> None:
    with torch.device("meta"):
        model = ModifiedDAC(CodecConfig.s2pro())
    count = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    # S2PRO.md: about 391 M (encoder 77 M, quantizer 261 M, decoder 54 M); exact: 76.84 + 260.46 + 54.09 M
    assert round(sum(count.values()) / 1e6) == 391
    assert round(count["encoder"] / 1e6) == 77
    assert 260e6 < count["quantizer"] < 261.5e6
    assert round(count["decoder"] / 1e6) == 54


@pytest.mark.parametrize(
    "change",
    [
        {"encoder_rates": (2, 4, 8)},
        {"decoder_rates": (8, 8, 4, 4)},
        {"latent_dim": 0},
        {"encoder_dim": 2.5},
        {"semantic_codebook_size": 40000},
    ],
)
def test_invalid_config_is_a_value_error(change: dict[str, object]) -> None:
    values = {**CodecConfig.tiny().__dict__, **change}
    with pytest.raises(ValueError):
        CodecConfig(**values)  # type: ignore[arg-type]


def test_invalid_transformer_config_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        TransformerConfig(n_layer=1, n_head=2, dim=64, head_dim=31, intermediate_size=192, window=128)


# ------------------------------------------------------------------------------------------------------ golden


def test_decode_matches_reference(codec: Codec, fixtures: Path) -> None:
    golden = np.load(fixtures / "d_codec_decode.npz")
    codes = torch.from_numpy(golden["codes"])[None]  # (1, 10, 16)
    with torch.inference_mode():
        z_q = codec.model.quantizer.decode(codes)[0].numpy()  # (64, 64)
    np.testing.assert_allclose(z_q, golden["z_q"], rtol=0, atol=1e-5)
    audio = codec.decode(golden["codes"])
    assert audio.shape == (16 * 2048,) and audio.dtype == np.float32
    np.testing.assert_allclose(audio, golden["audio"], rtol=0, atol=GOLDEN_AUDIO_TOL)


def test_encode_matches_reference(codec: Codec, fixtures: Path) -> None:
    golden = np.load(fixtures / "d_codec_encode.npz")
    wave = golden["wave"]  # (12988,)
    padded = torch.nn.functional.pad(torch.from_numpy(wave), (0, -len(wave) % 2048))[None, None]
    with torch.inference_mode():
        latent = codec.model.encoder(padded)[0].numpy()
    np.testing.assert_allclose(latent, golden["encoder_out"], rtol=0, atol=2e-5)

    codes = codec.encode(wave, 44100)
    assert codes.dtype == np.int16 and codes.shape == (10, 7) == golden["codes"].shape
    np.testing.assert_array_equal(codes, golden["codes"])
    np.testing.assert_allclose(codec.decode(codes), golden["recon_audio"], rtol=0, atol=GOLDEN_AUDIO_TOL)


def test_encode_accepts_a_tensor_and_int16(codec: Codec, fixtures: Path) -> None:
    wave = np.load(fixtures / "d_codec_encode.npz")["wave"]
    expected = codec.encode(wave, 44100)
    np.testing.assert_array_equal(codec.encode(torch.from_numpy(wave), 44100), expected)
    pcm = np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16)
    assert codec.encode(pcm, 44100).shape == expected.shape


def test_encode_resamples_to_44k(codec: Codec, fixtures: Path) -> None:
    import soxr

    wave = np.load(fixtures / "d_codec_encode.npz")["wave"]
    at_16k = soxr.resample(wave, 44100, 16000).astype(np.float32)
    codes = codec.encode(at_16k, 16000)
    resampled = soxr.resample(at_16k, 16000, 44100).astype(np.float32)
    assert codes.shape == (10, -(-len(resampled) // 2048))
    np.testing.assert_array_equal(codes, codec.encode(resampled, 44100))


def test_encode_edge_cases(codec: Codec) -> None:
    assert codec.encode(np.zeros(0, np.float32), 44100).shape == (10, 0)
    assert codec.encode(np.zeros(1, np.float32), 44100).shape == (10, 1)
    assert codec.encode(np.zeros(2048, np.float32), 44100).shape == (10, 1)
    assert codec.encode(np.zeros(2049, np.float32), 44100).shape == (10, 2)
    with pytest.raises(ValueError):
        codec.encode(np.zeros((2, 100), np.float32), 44100)
    with pytest.raises(ValueError):
        codec.encode(np.zeros(100, np.float32), 0)


def test_decode_rejects_bad_codes(codec: Codec) -> None:
    with pytest.raises(ValueError):
        codec.decode(np.zeros((9, 4), np.int64))
    with pytest.raises(ValueError):
        codec.decode(np.full((10, 4), -1, np.int64))
    with pytest.raises(ValueError):
        codec.decode(np.zeros((10, 4), np.float32))
    assert codec.decode(np.zeros((10, 0), np.int64)).shape == (0,)


def test_decode_in_bounded_passes_gives_the_same_samples(codec: Codec, fixtures: Path) -> None:
    golden = np.load(fixtures / "d_codec_decode.npz")
    chunked = Codec(codec.model, max_frames_per_pass=5)  # 16 frames -> passes of 5, 5, 5, 1
    np.testing.assert_allclose(chunked.decode(golden["codes"]), golden["audio"], rtol=0, atol=STREAM_TOL)


# ------------------------------------------------------------------------------------------------------ streaming


def _chunkings(n_frames: int) -> list[list[int]]:
    def fill(pattern: list[int]) -> list[int]:
        sizes: list[int] = []
        while sum(sizes) < n_frames:
            sizes.append(pattern[len(sizes) % len(pattern)])
        sizes[-1] -= sum(sizes) - n_frames
        return sizes

    rng = np.random.default_rng(7)
    randoms = [fill([1] + [int(k) for k in rng.integers(1, 9, 40)]) for _ in range(3)]
    return [[n_frames], fill([1]), fill([1, 1, 2, 4, 8]), fill([1, 5]), fill([3]), *randoms]


@pytest.mark.parametrize("chunking", _chunkings(24), ids=lambda c: ",".join(map(str, c[:8])))
def test_streaming_decode_equals_whole_decode(codec: Codec, chunking: list[int]) -> None:
    codes = _random_codes(codec.config, 24, seed=1)
    whole = _whole_decode(codec, codes)
    stream = codec.stream()
    parts, start = [], 0
    for size in chunking:
        part = stream.decode(codes[:, start : start + size])
        assert part.shape == (size * 2048,) and part.dtype == np.float32
        parts.append(part)
        start += size
    assert stream.frames_decoded == 24
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=STREAM_TOL)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_streaming_in_equal_chunks_equals_whole_decode_within_1e5(codec: Codec, fixtures: Path, size: int) -> None:
    """The issue's check: chunks of exactly 1, 2, 3 and 5 frames (30 frames = a whole number of each) == a whole
    decode within 1e-5, for random codes and for the fixture's codes."""
    golden = np.load(fixtures / "d_codec_decode.npz")["codes"]  # (10, 16)
    for codes in (_random_codes(codec.config, 30, seed=size), np.concatenate([golden, golden[:, :14]], axis=1)):
        whole = _whole_decode(codec, codes)
        stream = codec.stream()
        parts = [stream.decode(codes[:, start : start + size]) for start in range(0, 30, size)]
        assert {len(p) for p in parts} == {size * 2048}
        np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-5)


def test_streaming_reproduces_golden_audio_frame_by_frame(codec: Codec, fixtures: Path) -> None:
    golden = np.load(fixtures / "d_codec_decode.npz")
    stream = codec.stream()
    audio = np.concatenate([stream.decode(golden["codes"][:, i : i + 1]) for i in range(16)])
    np.testing.assert_allclose(audio, golden["audio"], rtol=0, atol=GOLDEN_AUDIO_TOL)


def test_reset_starts_a_new_stream_and_streams_are_independent(codec: Codec) -> None:
    codes_a = _random_codes(codec.config, 6, seed=2)
    codes_b = _random_codes(codec.config, 6, seed=3)
    a, b = codec.stream(), codec.stream()
    first = np.concatenate([a.decode(codes_a[:, :3]), b.decode(codes_b[:, :2]), a.decode(codes_a[:, 3:])])
    np.testing.assert_allclose(first[: 3 * 2048], _whole_decode(codec, codes_a)[: 3 * 2048], atol=STREAM_TOL)
    np.testing.assert_allclose(first[5 * 2048 :], _whole_decode(codec, codes_a)[3 * 2048 :], atol=STREAM_TOL)
    a.reset()
    assert a.frames_decoded == 0 and a.state.numel() == 0
    np.testing.assert_allclose(a.decode(codes_b), _whole_decode(codec, codes_b), rtol=0, atol=STREAM_TOL)


def test_post_module_window_holds_beyond_128_frames(codec: Codec) -> None:
    """The part with long memory (windowed attention): 300 frames streamed == whole, and the KV stays at 127."""
    codes = torch.from_numpy(_random_codes(codec.config, 300, seed=4))[None]
    quantizer = codec.model.quantizer
    with torch.inference_mode():
        whole = quantizer.decode(codes)  # (1, 64, 1200)
        state = StreamState()
        parts, start, rng = [], 0, np.random.default_rng(5)
        while start < 300:
            size = int(rng.integers(1, 20))
            parts.append(quantizer.decode(codes[..., start : start + size], state))
            start += size
            for k, _ in state.kv.values():
                assert k.shape[2] == min(start, codec.config.post_module.window - 1)
    torch.testing.assert_close(torch.cat(parts, dim=-1), whole, rtol=0, atol=1e-5)
    assert state.position[quantizer.post_module] == 300


def _steady_state_numel(codec: Codec) -> int:
    """Elements a stream holds once every window is full: each conv's left context plus a full KV window."""
    total = 0
    for part in (codec.model.quantizer.upsample, codec.model.decoder):
        for module in part.modules():
            if isinstance(module, CausalConv1d):
                total += module.conv.in_channels * module.left_pad
            elif isinstance(module, CausalConvTranspose1d):
                total += module.conv.in_channels * module.context_frames
    post = codec.config.post_module
    return total + 2 * post.n_layer * post.n_head * (post.window - 1) * post.head_dim


def test_streaming_state_stays_bounded_over_a_long_stream(codec: Codec) -> None:
    codes = _random_codes(codec.config, 300, seed=6)
    bound = _steady_state_numel(codec)
    stream = codec.stream()
    start, rng = 0, np.random.default_rng(8)
    while start < 300:
        size = min(int(rng.integers(1, 24)), 300 - start)
        out = stream.decode(codes[:, start : start + size])
        start += size
        assert np.isfinite(out).all()
        held = stream.state.numel()
        assert held <= bound
        if start >= codec.config.post_module.window - 1:
            assert held == bound  # constant from here on, however long the stream
    assert stream.frames_decoded == 300


# ------------------------------------------------------------------------------------------------------ loading


def test_load_accepts_wrapped_and_prefixed_checkpoints(
    codec: Codec, raw_state: dict[str, torch.Tensor], tmp_path: Path, fixtures: Path
) -> None:
    golden = np.load(fixtures / "d_codec_decode.npz")
    config = CodecConfig.tiny()
    variants = {
        "wrapped": {"state_dict": raw_state},
        "prefixed": {"generator." + k: v for k, v in raw_state.items()} | {"discriminator.conv.weight": torch.zeros(3)},
        "both": {"state_dict": {"generator." + k: v for k, v in raw_state.items()}},
    }
    for name, variant in variants.items():
        path = tmp_path / f"{name}.pth"
        torch.save(variant, path)
        loaded = load_codec(path, config=config)
        np.testing.assert_allclose(loaded.decode(golden["codes"][:, :4]), golden["audio"][: 4 * 2048], atol=1e-5)


def test_load_accepts_legacy_weight_norm_names(raw_state: dict[str, torch.Tensor], fixtures: Path) -> None:
    legacy = {
        k.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v"
        ): v
        for k, v in raw_state.items()
    }
    model = build_codec_model(load_codec_state_dict(legacy), CodecConfig.tiny())
    golden = np.load(fixtures / "d_codec_decode.npz")
    np.testing.assert_allclose(Codec(model).decode(golden["codes"]), golden["audio"], atol=GOLDEN_AUDIO_TOL)


def test_load_finds_the_config_next_to_the_checkpoint(codec: Codec) -> None:
    assert codec.config == CodecConfig.tiny()
    assert (codec.sample_rate, codec.frame_samples, codec.n_codebooks) == (44100, 2048, 10)


def test_load_errors_name_the_keys(raw_state: dict[str, torch.Tensor]) -> None:
    broken = dict(raw_state)
    del broken["decoder.model.0.conv.bias"]
    broken["decoder.extra.weight"] = torch.zeros(2)
    broken["quantizer.post_module.norm.weight"] = torch.zeros(65)
    with pytest.raises(CodecLoadError) as info:
        build_codec_model(load_codec_state_dict(broken), CodecConfig.tiny())
    error = info.value
    assert isinstance(error, ValueError)
    assert error.missing == ["decoder.model.0.conv.bias"]
    assert error.unexpected == ["decoder.extra.weight"]
    assert error.mismatched == [("quantizer.post_module.norm.weight", (65,), (64,))]
    for text in ("decoder.model.0.conv.bias", "decoder.extra.weight", "quantizer.post_module.norm.weight"):
        assert text in str(error)

    # strict=False tolerates extra keys, never missing ones
    extra = dict(raw_state) | {"decoder.extra.weight": torch.zeros(2)}
    build_codec_model(load_codec_state_dict(extra), CodecConfig.tiny(), strict=False)


def test_load_with_the_wrong_config_lists_shape_mismatches(fixtures: Path) -> None:
    with pytest.raises(CodecLoadError) as info:
        load_codec(fixtures / "codec" / "codec.pth", config=CodecConfig.s2pro())
    assert info.value.mismatched and "shape mismatches" in str(info.value)


def test_load_rejects_something_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    torch.save({"a": [1, 2, 3]}, path)
    with pytest.raises(CodecLoadError):
        load_codec(path, config=CodecConfig.tiny())


def test_bfloat16_codec_runs_and_stays_close(fixtures: Path) -> None:
    golden = np.load(fixtures / "d_codec_decode.npz")
    codec = load_codec(fixtures / "codec" / "codec.pth", dtype=torch.bfloat16)
    assert codec.dtype == torch.bfloat16
    audio = codec.decode(golden["codes"])
    assert audio.dtype == np.float32
    correlation = np.corrcoef(audio, golden["audio"])[0, 1]
    assert correlation > 0.9
    stream = codec.stream()
    streamed = np.concatenate([stream.decode(golden["codes"][:, i : i + 4]) for i in range(0, 16, 4)])
    assert np.corrcoef(streamed, golden["audio"])[0, 1] > 0.9
