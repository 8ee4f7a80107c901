"""Causal multi-head self-attention with RoPE through `scaled_dot_product_attention`."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ava.config import ModelConfig
from ava.model.rope import apply_rope

KVCache = tuple[torch.Tensor, torch.Tensor]


def attention_mask_4d(
    key_valid_BS: Optional[torch.Tensor], q_len: int, past_len: int, device: torch.device
) -> Optional[torch.Tensor]:
    """Boolean `[B, 1, L, S]` mask (True = attend) for causal attention over padded keys.

    Every query may always see itself, so a padding query never has an all-masked row (an
    all-masked row gives NaN in SDPA, and NaN would leak through later layers' values).
    """
    total = past_len + q_len
    q_pos = torch.arange(past_len, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    causal = k_pos <= q_pos
    if key_valid_BS is None:
        return None if past_len == 0 or q_len == 1 else causal[None, None]
    mask = causal[None] & key_valid_BS[:, None, :].bool()
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


class CausalSelfAttention(nn.Module):
    """Separate q/k/v/o projections: the Mixtral layout names them so, and export stays a rename."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, self.num_heads, self.head_dim = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(h, h, bias=cfg.bias)
        self.k_proj = nn.Linear(h, h, bias=cfg.bias)
        self.v_proj = nn.Linear(h, h, bias=cfg.bias)
        self.o_proj = nn.Linear(h, h, bias=cfg.bias)

    def forward(
        self,
        x_BLH: torch.Tensor,
        cos_BLD: torch.Tensor,
        sin_BLD: torch.Tensor,
        key_valid_BS: Optional[torch.Tensor] = None,
        past_kv: Optional[KVCache] = None,
    ) -> tuple[torch.Tensor, KVCache]:
        b, seq, h = x_BLH.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, seq, self.num_heads, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x_BLH)), cos_BLD, sin_BLD)
        k = apply_rope(heads(self.k_proj(x_BLH)), cos_BLD, sin_BLD)
        v = heads(self.v_proj(x_BLH))
        past_len = 0
        if past_kv is not None:
            past_len = past_kv[0].shape[2]
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        mask = attention_mask_4d(key_valid_BS, seq, past_len, x_BLH.device)
        is_causal = mask is None and past_len == 0 and seq > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(b, seq, h)
        return self.o_proj(y), (k, v)
