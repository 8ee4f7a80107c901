"""Token-to-expert routing: the router module and the pure top-k / Sinkhorn choice functions."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ava.config import ModelConfig


class Router(nn.Module):
    """Linear gate without bias; multiplicative input jitter in training only (Switch, Mixtral).

    With `model.expert_bias`, `balance_bias` `[E]` is a buffer, not a parameter: no optimizer
    touches it, it is saved and restored with the module's state (checkpoints, export), and the
    trainer moves it after each optimizer step (`update_expert_bias`). It is not named
    `expert_*` because expert-parallel checkpointers take MoE-layer keys containing "expert" for
    an expert's own tensor (`ava.train.expert_bias` says which)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.jitter = cfg.router_jitter
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.balance_bias: Optional[torch.Tensor]
        if cfg.expert_bias:
            self.register_buffer("balance_bias", torch.zeros(cfg.num_experts))
        else:
            self.balance_bias = None

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
    logits_TE: torch.Tensor, *, top_k: int, routing: str, sinkhorn_iters: int, training: bool,
    score: str = "softmax", normalize: bool = True, scale: float = 1.0,
    bias_E: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores (softmax or sigmoid) -> top-k -> optional renormalisation -> scaling.

    Returns (probs_TE, expert_TK, weight_TK), fp32: `probs_TE` are the scores made to sum to 1
    per token (the softmax itself; sigmoid scores divided by their sum, as DeepSeek-V3's balance
    loss takes them), which the balance loss and capacity priorities use; the mixing weights are
    the chosen raw scores. `bias_E` (auxiliary-loss-free balancing) shifts the scores experts
    are chosen by, never the mixing weights."""
    logits = logits_TE.float()
    if score == "sigmoid":
        scores_TE = torch.sigmoid(logits)
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    else:
        scores_TE = probs_TE = torch.softmax(logits, dim=-1)
    choice = sinkhorn_scores(logits_TE, sinkhorn_iters) if routing == "sinkhorn" and training else scores_TE
    if bias_E is not None:
        choice = choice + bias_E.float()
    expert_TK = choice.topk(top_k, dim=-1).indices
    weight_TK = scores_TE.gather(1, expert_TK)
    if normalize:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    if scale != 1.0:
        weight_TK = weight_TK * scale
    return probs_TE, expert_TK, weight_TK


def router_choice(cfg: ModelConfig, logits_TE: torch.Tensor, training: bool,
                  bias_E: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`choose_experts` with the model's routing settings."""
    return choose_experts(logits_TE, top_k=cfg.top_k, routing=cfg.routing, sinkhorn_iters=cfg.sinkhorn_iters,
                          training=training, score=cfg.router_score, normalize=cfg.normalize_top_k,
                          scale=cfg.routed_scaling_factor, bias_E=bias_E)


def update_expert_bias(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free update, in place: an expert above the mean load gets
    its bias lowered by `rate`, one below raised by `rate` (`load_E`: tokens per expert summed
    over every rank and micro-batch of the step)."""
    load = load_E.float()
    return bias_E.add_(rate * torch.sign(load.mean() - load))
