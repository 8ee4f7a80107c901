"""Expert capacity: which routed (token, expert) assignments an expert keeps when it is full.

Winners are deterministic: higher router probability first, then earlier position. All work is
sorts and scatters over `T*K` assignments, never a `[tokens, experts, capacity]` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Assignment:
    """The routing decision after capacity: a kept/dropped flag and final expert per slot."""

    expert_TK: torch.Tensor  # final expert of each slot (re-routed slots point to the new expert)
    weight_TK: torch.Tensor  # mixing weight of each slot (unchanged by re-routing)
    kept_TK: torch.Tensor  # bool: the slot is served by an expert
    all_kept: bool = False  # known without looking at the data (dropless): no slot is dropped

    @property
    def dropped_fraction(self) -> torch.Tensor:
        return 1.0 - self.kept_TK.float().mean()

    @property
    def unserved_T(self) -> torch.Tensor:
        """Tokens that no expert kept (the `residual` overflow policy serves these)."""
        return ~self.kept_TK.any(dim=-1)


def capacity_for(num_tokens: int, num_experts: int, capacity_factor: Optional[float]) -> Optional[int]:
    """`C = int(T / E * capacity_factor)`; None (dropless) when the factor is None."""
    if capacity_factor is None:
        return None
    return int(num_tokens / num_experts * capacity_factor)


def _rank_within_expert(expert_A: torch.Tensor, priority_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rank of each assignment among those of its expert, by (-priority, position)."""
    by_priority = torch.argsort(-priority_A, stable=True)
    order = by_priority[torch.argsort(expert_A[by_priority], stable=True)]
    # a scatter, not bincount: bincount's output size depends on the data (a host sync on GPUs,
    # a graph break under torch.compile)
    counts = torch.zeros(num_experts, dtype=expert_A.dtype, device=expert_A.device).scatter_add_(
        0, expert_A, torch.ones_like(expert_A))
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(expert_A.numel(), device=expert_A.device) - starts[expert_A[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


def apply_capacity(
    expert_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    probs_TE: torch.Tensor,
    capacity: Optional[int],
    overflow: str,
) -> Assignment:
    """Keep at most `capacity` assignments per expert; `next_best` re-routes the rest.

    `next_best` walks each token's remaining experts in probability order; in round r every
    token with a dropped slot offers its lowest dropped slot to its r-th best unchosen expert,
    which accepts while it has room (same priority rule). `drop` and `residual` keep the
    dropped slots unserved (`residual` is applied by the layer).
    """
    num_tokens, top_k = expert_TK.shape
    num_experts = probs_TE.shape[-1]
    if capacity is None:
        kept = torch.ones_like(expert_TK, dtype=torch.bool)
        return Assignment(expert_TK, weight_TK, kept, all_kept=True)

    expert_A = expert_TK.reshape(-1)
    priority_A = probs_TE.gather(1, expert_TK).reshape(-1)
    kept_TK = (_rank_within_expert(expert_A, priority_A, num_experts) < capacity).view(num_tokens, top_k)
    if overflow != "next_best" or top_k == num_experts:
        return Assignment(expert_TK, weight_TK, kept_TK)

    expert_TK = expert_TK.clone()
    load_E = torch.bincount(expert_A[kept_TK.reshape(-1)], minlength=num_experts)
    ranked_TE = torch.argsort(probs_TE, dim=-1, descending=True, stable=True)
    chosen = (ranked_TE[:, :, None] == expert_TK[:, None, :]).any(dim=-1)
    candidates_TC = ranked_TE[~chosen].view(num_tokens, num_experts - top_k)
    tokens = torch.arange(num_tokens, device=expert_TK.device)
    for r in range(num_experts - top_k):
        pending_TK = ~kept_TK
        offering_T = pending_TK.any(dim=-1)
        slot_T = pending_TK.int().argmax(dim=-1)  # lowest pending slot of each token
        cand_T = candidates_TC[:, r]
        # Tokens with nothing pending get priority -inf and an over-capacity rank below.
        priority_T = torch.where(offering_T, probs_TE[tokens, cand_T], -torch.inf)
        rank_T = _rank_within_expert(cand_T, priority_T, num_experts)
        accept_T = offering_T & (load_E[cand_T] + rank_T < capacity)
        load_E = load_E + torch.bincount(cand_T[accept_T], minlength=num_experts)
        expert_TK[tokens[accept_T], slot_T[accept_T]] = cand_T[accept_T]
        kept_TK[tokens[accept_T], slot_T[accept_T]] = True
    return Assignment(expert_TK, weight_TK, kept_TK)
