"""`AvaForCausalLM`: pre-norm MoE transformer blocks, tied embeddings, causal LM loss.

Single-device PyTorch, no I/O. Sharding and precision are the trainer's business.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ava.config import IGNORE_INDEX, ModelConfig
from ava.model.attention import (
    CausalSelfAttention,
    KVCache,
    attention_mask_4d,
    document_mask_4d,
    document_positions,
)
from ava.model.experts import DenseFFN, depth_scaled_std, init_experts, normal_
from ava.model.lm_loss import LMHead, linear_cross_entropy
from ava.model.moe import MoELayer
from ava.model.rope import RotaryEmbedding
from ava.model.routing_stats import RouterStats, RoutingCollector


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.bias)


def _init_linear(module: nn.Module, std: float) -> None:
    """A linear layer's or an embedding's weight ~ N(0, std), its bias (if any) zero."""
    with torch.no_grad():
        normal_(module.weight, std)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()


class Block(nn.Module):
    """`x + Attn(Norm(x))`, then `x + FFN(Norm(x))`: the MoE layer (`moe`), or for a layer the
    config lists as dense, a dense MLP (`mlp`, width `dense_ffn_size`). The FFN's norm is
    `moe_norm` in both, so the tensor names stay one scheme."""

    def __init__(self, cfg: ModelConfig, layer_index: int, collector: RoutingCollector) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.moe_norm = make_norm(cfg)
        dense = layer_index not in cfg.moe_layers
        self.moe: Optional[MoELayer] = None if dense else MoELayer(cfg, layer_index, collector)
        self.mlp: Optional[DenseFFN] = DenseFFN(cfg, cfg.dense_ffn_size) if dense else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        past_kv: Optional[KVCache] = None,
    ) -> tuple[torch.Tensor, KVCache]:
        a, kv = self.attn(self.attn_norm(x), cos, sin, mask, past_kv)
        x = x + a
        ffn = self.moe if self.moe is not None else self.mlp
        return x + ffn(self.moe_norm(x)), kv


@dataclass
class AvaOutput:
    logits: Optional[torch.Tensor]  # None in training with labels and model.loss_chunk_rows: never built
    loss: Optional[torch.Tensor] = None  # lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None  # mean over MoE layers (0 for a dense model)
    z_loss: Optional[torch.Tensor] = None  # mean over MoE layers (0 for a dense model)
    router_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer, in order
    past_key_values: Optional[list[KVCache]] = None


class AvaForCausalLM(nn.Module):
    """`init_weights=False` leaves the parameters as their modules' constructors made them, for
    a caller that runs `init_steps()` itself (a trainer whose parameters are partitioned as the
    modules are built) or loads every weight anyway."""

    def __init__(self, cfg: ModelConfig, init_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.dim_per_head, cfg.max_seq_len, cfg.rope_theta)
        self.routing = RoutingCollector()  # fed by every MoE layer in its forward
        self.layers = nn.ModuleList(Block(cfg, i, self.routing) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        if init_weights:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for _, step in self.init_steps():
                step()

    def init_steps(self) -> list[tuple[nn.Module, Callable[[], None]]]:
        """The initialisation as (module, step) pairs: each step writes that module's own
        parameters only, and the steps draw from torch's generator in this order, so running
        them in order gives the same weights for the same seed however the parameters are held."""
        std = self.cfg.init_std
        out_std = depth_scaled_std(std, self.cfg.num_layers)
        steps: list[tuple[nn.Module, Callable[[], None]]] = []
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output = name.endswith(("o_proj", "down_proj"))  # residual-branch outputs
                steps.append((module, functools.partial(_init_linear, module, out_std if is_output else std)))
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                steps.append((module, module.reset_parameters))
        steps += [(layer.moe.experts, functools.partial(init_experts, layer.moe.experts, std, out_std))
                  for layer in self.layers if layer.moe is not None]
        return steps

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[list[KVCache]] = None,
        use_cache: bool = False,
        document_ids: Optional[torch.Tensor] = None,
    ) -> AvaOutput:
        """`labels[b, t]` is the target for position t (already shifted); -100 is ignored.

        `attention_mask` `[B, past + L]` (1 = token, 0 = padding) covers cached and new tokens;
        with it, positions count real tokens only, so left-padded prompts decode correctly.
        `document_ids` `[B, L]` numbers the documents packed in each row: attention stays inside
        each and positions restart at each (training on packed data; no cache, no padding mask).
        """
        batch, seq = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if past_len + seq > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {past_len + seq} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        if document_ids is not None:
            if attention_mask is not None or past_key_values is not None or position_ids is not None:
                raise ValueError("document_ids replaces attention_mask, position_ids and past_key_values; "
                                 "pass it alone")
            mask = document_mask_4d(document_ids)
            position_ids = document_positions(document_ids)
        else:
            mask = attention_mask_4d(attention_mask, seq, past_len, input_ids.device)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -seq:]
            else:
                position_ids = torch.arange(past_len, past_len + seq, device=input_ids.device)
                position_ids = position_ids.expand(batch, seq)
        cos, sin = self.rotary(position_ids)

        x = self.embed_tokens(input_ids)
        cache: list[KVCache] = []
        use_ckpt = self.cfg.activation_checkpointing and self.training and not use_cache
        self.routing.begin()
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            if use_ckpt:
                x, kv = checkpoint(layer, x, cos, sin, mask, past, use_reentrant=False)
            else:
                x, kv = layer(x, cos, sin, mask, past)
            if use_cache:
                cache.append(kv)
        stats = self.routing.take(self.cfg.moe_layers)
        x = self.norm(x)
        chunk = self.cfg.loss_chunk_rows
        lm_loss = logits = None
        # an untied head runs as its module (ZeRO-3 gathers a partitioned weight in its hooks)
        if labels is not None and chunk and self.training and torch.is_grad_enabled():
            if self.lm_head is None:
                lm_loss = linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.embed_tokens.weight,
                                               labels.reshape(-1), chunk)
            else:
                lm_loss = self.lm_head(x, labels, chunk)
        else:
            logits = F.linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
            if labels is not None:
                lm_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                          ignore_index=IGNORE_INDEX)
        if stats:
            aux = torch.stack([s.aux_loss for s in stats]).mean()
            z = torch.stack([s.z_loss for s in stats]).mean()
        else:
            aux = z = x.new_zeros((), dtype=torch.float32)
        out = AvaOutput(logits=logits, aux_loss=aux, z_loss=z, router_stats=stats,
                        past_key_values=cache if use_cache else None)
        if lm_loss is not None:
            out.lm_loss = lm_loss
            out.loss = lm_loss + self.cfg.aux_loss_coef * aux + self.cfg.z_loss_coef * z
        return out

    def num_parameters(self, active_only: bool = False) -> int:
        """Unique parameters (tied weights once). Active: what one token uses — top_k of E experts
        (shared experts and dense layers in full), without the `residual` FFN, which serves only
        overflow tokens."""
        total = sum(p.numel() for p in self.parameters())
        if not active_only:
            return total
        cfg = self.cfg
        for layer in self.layers:
            if layer.moe is None:
                continue
            expert_params = sum(p.numel() for p in layer.moe.experts.parameters())
            total -= expert_params - expert_params // cfg.num_experts * cfg.top_k
            if layer.moe.residual is not None:
                total -= sum(p.numel() for p in layer.moe.residual.parameters())
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 x (active non-embedding params + the LM-head matmul, which
        a tied embedding still computes) + 12 x layers x heads x head_dim x seq_len for attention
        scores and values (grouped-query attention shares k/v, not the score matmuls)."""
        cfg = self.cfg
        embedding = cfg.vocab_size * cfg.hidden_size
        matmul_params = self.num_parameters(active_only=True) - embedding
        if self.lm_head is None:
            matmul_params += embedding
        return 6 * matmul_params + 12 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq_len
