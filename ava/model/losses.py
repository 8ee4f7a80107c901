"""MoE auxiliary losses and utilisation statistics, as pure functions (unit-testable alone)."""

from __future__ import annotations

import torch


def load_balancing_loss(*, probs_TE: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance loss `E * sum_i f_i * P_i`.

    `f_i` is the fraction of routed assignments that chose expert i (sums to 1 over experts, so
    top-k does not inflate the loss) and `P_i` the mean router probability of expert i. It is
    exactly 1.0 for perfectly uniform routing and grows towards E as routing collapses.
    """
    num_experts = probs_TE.shape[-1]
    f_E = routed_counts(expert_TK, num_experts) / expert_TK.numel()
    p_E = probs_TE.float().mean(dim=0)
    return num_experts * (f_E * p_E).sum()


def sequence_balancing_loss(*, probs_TE: torch.Tensor, expert_TK: torch.Tensor, seq_len: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: `E * sum_i f_i * P_i` within each sequence of
    `seq_len` consecutive tokens, averaged over the sequences (balance inside every sequence,
    not only over the batch)."""
    num_experts, top_k = probs_TE.shape[-1], expert_TK.shape[-1]
    expert_BA = expert_TK.reshape(-1, seq_len * top_k)
    counts_BE = torch.zeros(expert_BA.shape[0], num_experts, device=expert_TK.device).scatter_add_(
        1, expert_BA, torch.ones_like(expert_BA, dtype=torch.float32))
    f_BE = counts_BE / (seq_len * top_k)
    p_BE = probs_TE.float().reshape(-1, seq_len, num_experts).mean(dim=1)
    return num_experts * (f_BE * p_BE).sum(dim=-1).mean()


def router_z_loss(*, logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss `mean(logsumexp(logits)^2)`: keeps router logits small and softmax stable."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def routed_counts(expert_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert as fp32 `[E]` (a scatter, so no host sync and no one-hot tensor)."""
    flat = expert_TK.reshape(-1)
    ones = torch.ones_like(flat, dtype=torch.float32)
    return torch.zeros(num_experts, device=flat.device).scatter_add_(0, flat, ones)


def gini(counts_E: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of expert load: 0 for uniform, (E-1)/E when one expert takes everything."""
    x = counts_E.float().sort().values
    n = x.numel()
    i = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
    total = x.sum().clamp_min(torch.finfo(x.dtype).tiny)
    return ((2 * i - n - 1) * x).sum() / (n * total)


def entropy(counts_E: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the load distribution: log(E) for uniform, 0 for one-hot."""
    x = counts_E.float()
    p = x / x.sum().clamp_min(torch.finfo(x.dtype).tiny)
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum()
