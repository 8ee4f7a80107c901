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
