"""The dual-AR network against the reference's outputs (fixtures a and b), in float32 on the CPU."""

from __future__ import annotations

import pytest
import torch

from engine.dualar.config import load_config
from engine.dualar.loader import load_model
from engine.dualar.model import DualAR, RMSNorm, rope_table
from engine.dualar.presets import preset_config, random_model
from tests.engine.dualar import MODEL_DIR, golden

ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> DualAR:
    return load_model(MODEL_DIR, dtype="float32", progress=False)


def _t(name: str, key: str) -> torch.Tensor:
    return torch.from_numpy(golden(name)[key])


@torch.inference_mode()
def test_input_embeddings_sum_codebooks_at_semantic_positions(model: DualAR) -> None:
    embeds = model.slow.embed(_t("a", "prompt")[None])[0]
    torch.testing.assert_close(embeds, _t("a", "input_embeds"), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_slow_ar_full_prompt_logits_and_hidden(model: DualAR) -> None:
    hidden = model.slow(_t("a", "prompt")[None])[0]  # no KV cache
    torch.testing.assert_close(hidden, _t("a", "hidden"), atol=ATOL, rtol=0)
    torch.testing.assert_close(model.slow.logits(hidden), _t("a", "logits"), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_slow_ar_prefill_in_chunks_with_kv_cache(model: DualAR) -> None:
    """Two prefills at increasing input_pos see the first one's keys: what a prefix cache relies on."""
    model.setup_caches(1, 256)
    prompt = _t("a", "prompt")[None]
    first = model.slow(prompt[:, :, :100], torch.arange(100))[0]
    second = model.slow(prompt[:, :, 100:], torch.arange(100, 174))[0]
    torch.testing.assert_close(torch.cat([first, second]), _t("a", "hidden"), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_rope_table_rounding_to_bfloat16_is_what_matches(model: DualAR) -> None:
    table = rope_table(64, 16, 1e6)
    assert torch.equal(table, table.to(torch.bfloat16).float())
    saved = model.slow.rope
    try:  # a float32 table: the README's ~1e-3 disagreement
        c = model.config.slow
        freqs = 1.0 / (c.rope_base ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        angles = torch.outer(torch.arange(c.max_seq_len, dtype=torch.float32), freqs)
        model.slow.rope = torch.stack([angles.cos(), angles.sin()], dim=-1)
        hidden = model.slow(_t("a", "prompt")[None])[0]
    finally:
        model.slow.rope = saved
    assert (hidden - _t("a", "hidden")).abs().max() > 10 * ATOL


@torch.inference_mode()
def test_fast_ar_one_frame_without_and_with_cache(model: DualAR) -> None:
    hidden, codes = _t("b", "hidden"), _t("b", "codes")
    x = torch.cat([hidden[None], model.fast.embeddings(codes[:-1])])[None]  # (1, 10, D)
    torch.testing.assert_close(model.fast(x)[0], _t("b", "logits_nocache"), atol=ATOL, rtol=0)
    model.setup_caches(1, 256)
    stepped = torch.cat([model.fast(x[:, k : k + 1], torch.tensor([k]))[0] for k in range(10)])
    torch.testing.assert_close(stepped, _t("b", "logits"), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_batch_rows_are_independent(model: DualAR) -> None:
    prompt = _t("a", "prompt")
    other = prompt.clone()
    other[0, 150:160] = torch.arange(65, 75)  # different text, same length
    batch = torch.stack([prompt, other])
    model.setup_caches(2, 256)
    hidden = model.slow(batch, torch.arange(174))  # shared positions
    torch.testing.assert_close(hidden[0], _t("a", "hidden"), atol=ATOL, rtol=0)
    alone = model.slow(other[None])[0]
    torch.testing.assert_close(hidden[1], alone, atol=ATOL, rtol=0)
    # per-row positions (B, S): one more step each, as continuous batching would feed them
    step = torch.stack([prompt[:, -1:], other[:, -1:]])
    per_row = model.slow(step, torch.tensor([[173], [173]]))
    torch.testing.assert_close(per_row[:, 0], hidden[:, -1], atol=ATOL, rtol=0)


def test_rmsnorm_computes_in_float32() -> None:
    norm = RMSNorm(8, 1e-6).to(torch.bfloat16)
    x = torch.randn(3, 8) * 300
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    with torch.no_grad():
        out = norm(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.02, rtol=0.01)


@torch.inference_mode()
def test_bfloat16_model_stays_close_to_float32() -> None:
    model = load_model(MODEL_DIR, dtype="bfloat16", progress=False)
    hidden = model.slow(_t("a", "prompt")[None])[0].float()
    reference = _t("a", "hidden")
    cosine = torch.nn.functional.cosine_similarity(hidden, reference, dim=-1)
    assert cosine.min() > 0.99


def test_tiny_preset_is_the_fixture_config() -> None:
    assert preset_config("tiny") == load_config(MODEL_DIR)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset_config("huge")


def test_s2pro_preset_has_the_published_sizes() -> None:
    """S2PRO.md: about 4.1 B slow + 0.42 B fast parameters; the slow KV cache is 144 KiB per position in bf16.
    Built on the meta device: shapes only, no memory."""
    config = preset_config("s2pro")
    assert (config.slow.dim, config.slow.n_layer, config.slow.n_head, config.slow.n_local_heads) == (2560, 36, 32, 8)
    assert (config.slow.vocab_size, config.codebook_size, config.num_codebooks) == (155776, 4096, 10)
    with torch.device("meta"):
        model = DualAR(config).to(torch.bfloat16)
    assert round(sum(p.numel() for p in model.slow.parameters()) / 1e8) == 41
    assert round(sum(p.numel() for p in model.fast.parameters()) / 1e7) == 42
    model.setup_caches(1, 1)
    kv = sum(b.numel() * b.element_size() for name, b in model.slow.named_buffers() if "kv_cache" in name)
    assert kv == 144 * 1024


@torch.inference_mode()
def test_random_preset_model_is_seeded_and_runs() -> None:
    first, again, other = random_model("tiny", seed=1), random_model("tiny", seed=1), random_model("tiny", seed=2)
    weight = "slow.layers.0.attention.wqkv.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])
    hidden = first.slow(_t("a", "prompt")[None])
    assert hidden.shape == (1, 174, 64) and torch.isfinite(hidden).all()
