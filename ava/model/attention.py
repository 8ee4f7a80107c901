"""Causal self-attention with RoPE through `scaled_dot_product_attention`: multi-head or
grouped-query (`num_kv_heads`), an explicit `head_dim`, optional q/k RMSNorm and q/k/v biases."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ava.config import ModelConfig
from ava.model.rope import apply_rope

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys and values `[B, kv_heads, S, head_dim]`


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


def document_mask_4d(document_ids_BL: torch.Tensor) -> torch.Tensor:
    """Boolean `[B, 1, L, L]`: causal attention within each packed document (block-diagonal)."""
    seq = document_ids_BL.shape[1]
    same = document_ids_BL[:, :, None] == document_ids_BL[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids_BL.device).tril()
    return (same & causal)[:, None]


def document_positions(document_ids_BL: torch.Tensor) -> torch.Tensor:
    """RoPE positions `[B, L]` that restart at 0 where each document starts."""
    batch, seq = document_ids_BL.shape
    index = torch.arange(seq, device=document_ids_BL.device).expand(batch, seq)
    first = torch.ones_like(document_ids_BL, dtype=torch.bool)
    first[:, 1:] = document_ids_BL[:, 1:] != document_ids_BL[:, :-1]
    return index - torch.cummax(torch.where(first, index, 0), dim=1).values


class CausalSelfAttention(nn.Module):
    """Separate q/k/v/o projections: the Hugging Face layouts name them so, and export stays a
    rename. The KV cache holds the kv heads only; SDPA shares each among its query group.

    `qk_norm`: `head` normalises each head's q and k over `head_dim` (Qwen3, one weight of
    `head_dim` shared by the heads); `full` normalises the whole q and k projections before the
    head split (OLMoE, weights of `heads·head_dim` and `kv_heads·head_dim`). Both before RoPE."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, self.num_heads, self.head_dim = cfg.hidden_size, cfg.num_heads, cfg.dim_per_head
        self.kv_heads = cfg.kv_heads
        q_width, kv_width = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        qkv_bias = cfg.bias or cfg.attn_bias
        self.q_proj = nn.Linear(h, q_width, bias=qkv_bias)
        self.k_proj = nn.Linear(h, kv_width, bias=qkv_bias)
        self.v_proj = nn.Linear(h, kv_width, bias=qkv_bias)
        self.o_proj = nn.Linear(q_width, h, bias=cfg.bias)
        self.qk_norm = cfg.qk_norm
        self.q_norm: Optional[nn.RMSNorm] = None
        self.k_norm: Optional[nn.RMSNorm] = None
        if cfg.qk_norm == "head":
            self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = nn.RMSNorm(q_width, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(kv_width, eps=cfg.norm_eps)

    def forward(
        self,
        x_BLH: torch.Tensor,
        cos_BLD: torch.Tensor,
        sin_BLD: torch.Tensor,
        mask_B1LS: Optional[torch.Tensor] = None,
        past_kv: Optional[KVCache] = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """`mask_B1LS` (True = attend) from `attention_mask_4d` or `document_mask_4d`; None: causal."""
        b, seq, _ = x_BLH.shape

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(b, seq, n, self.head_dim).transpose(1, 2)

        q, k, v = self.q_proj(x_BLH), self.k_proj(x_BLH), self.v_proj(x_BLH)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = heads(q, self.num_heads), heads(k, self.kv_heads), heads(v, self.kv_heads)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos_BLD, sin_BLD)
        k = apply_rope(k, cos_BLD, sin_BLD)
        past_len = 0
        if past_kv is not None:
            past_len = past_kv[0].shape[2]
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        is_causal = mask_B1LS is None and past_len == 0 and seq > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1LS, is_causal=is_causal,
                                           enable_gqa=self.kv_heads != self.num_heads)
        y = y.transpose(1, 2).reshape(b, seq, self.num_heads * self.head_dim)
        return self.o_proj(y), (k, v)
