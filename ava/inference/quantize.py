"""Int8 weight-only quantization: per-output-channel symmetric scales, dequantized on use.

Implemented as a `torch.nn.utils.parametrize` parametrization, so the model's own forward code
runs unchanged: reading `layer.q_proj.weight` or `experts.w1` yields the dequantized tensor.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ava.model import AvaForCausalLM


def quantize_int8(w: torch.Tensor, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output channel (and per expert): the max over `in_dim` only."""
    scale = w.float().abs().amax(dim=in_dim, keepdim=True).clamp_min(1e-12) / 127.0
    q = torch.clamp(torch.round(w.float() / scale), -127, 127).to(torch.int8)
    return q, scale


class Int8Weight(nn.Module):
    """Parametrization: the stored `original` is int8; reading the weight dequantizes it."""

    def __init__(self, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.dtype = dtype

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return (q.float() * self.scale).to(self.dtype)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w  # already int8: registration passes the quantized tensor


def _quantize_param(module: nn.Module, name: str, in_dim: int) -> tuple[int, int]:
    w = getattr(module, name)
    q, scale = quantize_int8(w.detach(), in_dim)
    setattr(module, name, nn.Parameter(q, requires_grad=False))
    parametrize.register_parametrization(module, name, Int8Weight(scale, w.dtype), unsafe=True)
    before = w.numel() * w.element_size()
    after = q.numel() + scale.numel() * scale.element_size()
    return before, after


def quantize_model_int8(model: AvaForCausalLM) -> tuple[int, int]:
    """Quantize attention projections and expert matrices in place; returns (bytes before, after)."""
    before = after = 0
    for layer in model.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            b, a = _quantize_param(getattr(layer.attn, proj), "weight", in_dim=1)  # Linear: [out, in]
            before, after = before + b, after + a
        experts = layer.moe.experts if layer.moe is not None else None
        for name in ("w1", "w_gate_up", "w2", "w_down"):
            if experts is not None and hasattr(experts, name):
                # stacked [E, in, out]: a scale per output column, so the fused gate and up halves
                # of `w_gate_up` get the same scales as separate matrices would
                b, a = _quantize_param(experts, name, in_dim=1)
                before, after = before + b, after + a
    return before, after
