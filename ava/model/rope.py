"""Rotary position embeddings (rotate-half convention, as in GPT-NeoX, Llama and Mixtral).

The rotate-half layout is what `transformers`' Mixtral uses, so exported q/k weights need no
permutation to load there.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `[max_len, head_dim]` in fp32 (computed once; low precision drifts)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BNLD: torch.Tensor, cos_BLD: torch.Tensor, sin_BLD: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys `[B, heads, L, D]` by per-position angles `[B, L, D]`."""
    cos, sin = cos_BLD.unsqueeze(1).to(x_BNLD.dtype), sin_BLD.unsqueeze(1).to(x_BNLD.dtype)
    return x_BNLD * cos + rotate_half(x_BNLD) * sin


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables as non-persistent buffers (never saved, rebuilt from config)."""

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        self.max_len = max_len
        cos, sin = rope_tables(head_dim, max_len, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, position_ids_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[position_ids_BL], self.sin[position_ids_BL]
