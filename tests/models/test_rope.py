"""RoPE scaling against transformers' own rotary embedding: cos and sin of every position, for each scaling
type (linear, dynamic NTK, llama3, YaRN, LongRoPE) parsed from a config.json as Sift parses it."""
from __future__ import annotations

import pytest
import torch

from sift.models.layers import rope_cos_sin
from sift.models.registry import ArchConfig

BASE = dict(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256)
SCALINGS = {
    "linear": dict(rope_type="linear", factor=3.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    "yarn-mscale-untruncated": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=0.7,
                                    mscale_all_dim=0.3, beta_fast=16, beta_slow=2, truncate=False),
    "longrope-long": dict(rope_type="longrope", original_max_position_embeddings=64,
                          short_factor=[1.0 + 0.1 * i for i in range(32)], long_factor=[1.0 + i for i in range(32)]),
    "longrope-short-partial": dict(rope_type="longrope", original_max_position_embeddings=256, partial_rotary_factor=0.75,
                                   short_factor=[1.0 + 0.1 * i for i in range(24)], long_factor=[2.0] * 24),
}


def _hf_cos_sin(config, positions: torch.Tensor, one_at_a_time: bool) -> tuple:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    if not one_at_a_time:
        return rotary(x, positions[None])
    rows = [rotary(x, p.view(1, 1)) for p in positions]  # a decode step each: HF's dynamic base grows with them
    return torch.cat([c for c, _ in rows], dim=1), torch.cat([s for _, s in rows], dim=1)


@pytest.mark.parametrize("name", SCALINGS)
def test_rope_scaling_matches_transformers(name):
    from transformers import LlamaConfig

    params = dict(SCALINGS[name], rope_theta=10000.0)
    config = LlamaConfig(**BASE, rope_parameters=params)
    arch = ArchConfig.from_hf_config(dict(config.to_dict(), architectures=["LlamaForCausalLM"]))
    rd = int(64 * arch.partial_rotary_factor)
    cos, sin = rope_cos_sin(rd, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling_dict)
    positions = torch.arange(arch.max_position_embeddings)
    # a prompt longer than the original context in one forward (dynamic: one position per forward, as decoded)
    hf_cos, hf_sin = _hf_cos_sin(config, positions, one_at_a_time=name == "dynamic")
    # angles of up to ~500 rad carry float32 rounding of ~3e-5 (dynamic computes its per-position bases
    # vectorized, HF one scalar at a time: the last bit of a base can differ); the other types agree to ~1e-6
    tol = 5e-5 if name == "dynamic" else 2e-6
    torch.testing.assert_close(torch.cat([cos, cos], -1), hf_cos[0], atol=tol, rtol=0)
    torch.testing.assert_close(torch.cat([sin, sin], -1), hf_sin[0], atol=tol, rtol=0)
    plain_cos, _ = rope_cos_sin(rd, arch.max_position_embeddings, 10000.0, {})
    assert (plain_cos - cos).abs().max() > 1e-2  # the scaling changes the angles at these positions
    if name == "dynamic":  # serves factor x the configured context; unscaled within the original one
        assert arch.max_position_embeddings == 2 * BASE["max_position_embeddings"]
        torch.testing.assert_close(cos[:256], plain_cos[:256], atol=0, rtol=0)
