"""The MoE layer: route, apply capacity, dispatch by sorting, grouped matmul, combine."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ava.config import ModelConfig
from ava.model.capacity import Assignment, apply_capacity, capacity_for
from ava.model.experts import DenseFFN, Experts
from ava.model.losses import entropy, gini, load_balancing_loss, routed_counts, router_z_loss
from ava.model.router import Router, choose_experts


@dataclass
class RouterStats:
    """Per-layer routing health, detached, on device (the caller decides when to sync).

    `tokens_per_expert` counts the router's choices before capacity, so a collapsing router
    shows in Gini/entropy even when capacity hides it; `dropped_fraction` shows what capacity cut.
    """

    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    gini: torch.Tensor
    entropy: torch.Tensor


def dispatch_combine(x_TH: torch.Tensor, assignment: Assignment, experts: Experts) -> torch.Tensor:
    """Sort kept (token, expert) pairs by expert, run all experts at once, scatter-add back."""
    top_k = assignment.expert_TK.shape[1]
    kept_A = assignment.kept_TK.reshape(-1)
    token_A = torch.arange(x_TH.shape[0], device=x_TH.device).repeat_interleave(top_k)[kept_A]
    expert_A = assignment.expert_TK.reshape(-1)[kept_A]
    weight_A = assignment.weight_TK.reshape(-1)[kept_A]
    order = torch.argsort(expert_A, stable=True)
    token_S, expert_S = token_A[order], expert_A[order]
    counts_E = torch.bincount(expert_A, minlength=experts.num_experts)
    y_SH = experts(x_TH[token_S], expert_S, counts_E)
    y_SH = y_SH * weight_A[order].to(y_SH.dtype)[:, None]
    return torch.zeros_like(x_TH).index_add_(0, token_S, y_SH)


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.residual = DenseFFN(cfg) if cfg.overflow == "residual" else None

    def route(self, x_TH: torch.Tensor) -> tuple[Assignment, RouterStats]:
        cfg = self.cfg
        logits_TE = self.router(x_TH)
        probs_TE, expert_TK, weight_TK = choose_experts(
            logits_TE, top_k=cfg.top_k, routing=cfg.routing,
            sinkhorn_iters=cfg.sinkhorn_iters, training=self.training,
        )
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        capacity = capacity_for(x_TH.shape[0], cfg.num_experts, factor)
        assignment = apply_capacity(expert_TK, weight_TK, probs_TE, capacity, cfg.overflow)
        counts_E = routed_counts(expert_TK, cfg.num_experts)
        stats = RouterStats(
            tokens_per_expert=counts_E,
            dropped_fraction=assignment.dropped_fraction.detach(),
            aux_loss=load_balancing_loss(probs_TE=probs_TE, expert_TK=expert_TK),
            z_loss=router_z_loss(logits_TE=logits_TE),
            gini=gini(counts_E),
            entropy=entropy(counts_E),
        )
        return assignment, stats

    def forward(self, x_BLH: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        x_TH = x_BLH.reshape(-1, x_BLH.shape[-1])
        assignment, stats = self.route(x_TH)
        y_TH = dispatch_combine(x_TH, assignment, self.experts)
        if self.residual is not None:
            rows = assignment.unserved_T.nonzero().squeeze(-1)
            y_TH = y_TH.index_add(0, rows, self.residual(x_TH[rows]))
        return y_TH.view_as(x_BLH), stats
