"""Preset sizes and parameter counts against a closed form written out here."""

import pytest
import torch

from ava.config import model_preset
from ava.model import AvaForCausalLM

# name: (hidden, layers, heads, ffn, experts, mixtral-style) -- DESIGN.md's preset table
PRESETS = {
    "tiny": (384, 10, 6, 1536, 4, False),
    "small": (512, 14, 8, 2048, 8, False),
    "base": (768, 18, 12, 3072, 8, False),
    "large": (1024, 24, 16, 4096, 16, False),
    "tiny_mixtral": (384, 10, 6, 1536, 4, True),
    "small_mixtral": (512, 14, 8, 2048, 8, True),
}
VOCAB, TOP_K = 65536, 2


def closed_form(h: int, n_layers: int, ffn: int, n_experts: int, mixtral: bool) -> tuple[int, int]:
    """(total, active) parameters: tied embedding, q/k/v/o, two norms per block, router, experts."""
    norm = h if mixtral else 2 * h  # RMSNorm weight | LayerNorm weight + bias
    attn = 4 * h * h + (0 if mixtral else 4 * h)
    expert = 3 * h * ffn if mixtral else 2 * h * ffn + ffn + h  # SwiGLU | GELU with biases
    layer_shared = attn + 2 * norm + h * n_experts
    total = VOCAB * h + n_layers * (layer_shared + n_experts * expert) + norm
    active = VOCAB * h + n_layers * (layer_shared + TOP_K * expert) + norm
    return total, active


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_closed_form(name):
    h, n_layers, heads, ffn, n_experts, mixtral = PRESETS[name]
    cfg = model_preset(name)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.ffn_size, cfg.num_experts) == (
        h, n_layers, heads, ffn, n_experts)
    assert (cfg.vocab_size, cfg.top_k, cfg.router_jitter, cfg.capacity_factor) == (VOCAB, TOP_K, 0.01, 3.0)
    with torch.device("meta"):
        model = AvaForCausalLM(cfg)
    total, active = closed_form(h, n_layers, ffn, n_experts, mixtral)
    assert model.num_parameters() == total
    assert model.num_parameters(active_only=True) == active


def test_small_preset_is_about_284m_parameters():
    with torch.device("meta"):
        model = AvaForCausalLM(model_preset("small"))
    assert 283_000_000 < model.num_parameters() < 285_000_000


def test_flops_per_token_formula():
    cfg = model_preset("nano")
    model = AvaForCausalLM(cfg)
    active_matmul = model.num_parameters(active_only=True)  # tied: embedding rows == LM head matmul
    expected = 6 * active_matmul + 12 * cfg.num_layers * cfg.hidden_size * 128
    assert model.flops_per_token(128) == expected


def family_closed_form(c) -> tuple[int, int]:
    """(total, active) for the family-shaped presets (RMSNorm, SwiGLU, no biases, untied)."""
    d = c.head_dim or c.hidden_size // c.num_heads
    h, kv = c.hidden_size, c.num_kv_heads or c.num_heads
    attn = 2 * h * c.num_heads * d + 2 * h * kv * d  # q and o; k and v of the kv heads
    attn += {"none": 0, "head": 2 * d, "full": c.num_heads * d + kv * d}[c.qk_norm]
    dense = set(range(c.first_dense_layers)) | set(c.dense_layers)
    moe_layers = c.num_layers - len(dense)
    expert = 3 * h * c.ffn_size
    shared = 3 * h * c.shared_experts * (c.shared_ffn_size or c.ffn_size)
    dense_mlp = 3 * h * (c.dense_ffn_size or c.ffn_size)
    fixed = 2 * c.vocab_size * h + h + c.num_layers * (attn + 2 * h) + len(dense) * dense_mlp
    moe_fixed = moe_layers * (h * c.num_experts + shared)
    return (fixed + moe_fixed + moe_layers * c.num_experts * expert,
            fixed + moe_fixed + moe_layers * c.top_k * expert)


FAMILIES = {  # preset: (kv heads, head_dim, qk_norm, experts, top_k, dense layers, shared experts, router)
    "mini_mixtral": (2, 32, "none", 8, 2, 0, 0, ("softmax", True, 1.0)),
    "mini_olmoe": (8, 32, "full", 64, 8, 0, 0, ("softmax", False, 1.0)),
    "mini_qwen3_moe": (2, 64, "head", 64, 8, 0, 0, ("softmax", True, 1.0)),
    "mini_deepseek": (8, 32, "none", 32, 4, 1, 1, ("sigmoid", True, 2.5)),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_presets_have_their_shape_and_closed_form_counts(name):
    kv, d, qk_norm, experts, top_k, dense, shared, router = FAMILIES[name]
    cfg = model_preset(name)
    assert (cfg.kv_heads, cfg.dim_per_head, cfg.qk_norm, cfg.num_experts, cfg.top_k) == (kv, d, qk_norm, experts, top_k)
    assert (cfg.num_layers - len(cfg.moe_layers), cfg.shared_experts) == (dense, shared)
    assert (cfg.router_score, cfg.normalize_top_k, cfg.routed_scaling_factor) == router
    assert not cfg.tie_embeddings and cfg.capacity_factor in (None, 3.0)
    with torch.device("meta"):
        model = AvaForCausalLM(cfg)
    assert (model.num_parameters(), model.num_parameters(active_only=True)) == family_closed_form(cfg)
