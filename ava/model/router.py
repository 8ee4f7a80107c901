"""Token-to-expert routing: the router module and the pure top-k / Sinkhorn choice functions."""

from __future__ import annotations

import torch
from torch import nn

from ava.config import ModelConfig


class Router(nn.Module):
    """Linear gate without bias; multiplicative input jitter in training only (Switch, Mixtral)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.jitter = cfg.router_jitter
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TH).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TH = x_TH * noise
        return self.gate(x_TH)


def sinkhorn_scores(logits_TE: torch.Tensor, iters: int) -> torch.Tensor:
    """Log-domain Sinkhorn: scores whose top-k spreads tokens evenly over experts.

    Alternating column/row normalisation approximates the balanced transport plan (BASE layers,
    Megatron's sinkhorn router); used only to *choose* experts, never as mixing weights.
    """
    log_p = logits_TE.float()
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p


def choose_experts(
    logits_TE: torch.Tensor, *, top_k: int, routing: str, sinkhorn_iters: int, training: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax -> top-k -> renormalise. Returns (probs_TE fp32, expert_TK, weight_TK fp32)."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    scores = probs_TE
    if routing == "sinkhorn" and training:
        scores = sinkhorn_scores(logits_TE, sinkhorn_iters)
    expert_TK = scores.topk(top_k, dim=-1).indices
    weight_TK = probs_TE.gather(1, expert_TK)
    weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    return probs_TE, expert_TK, weight_TK
