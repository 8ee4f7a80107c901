"""Routing statistics of one forward pass, and the collector every MoE layer feeds.

A layer's forward returns its output tensor alone (what any replacement layer the trainer swaps
in returns too); its `RouterStats` — tokens per expert, dropped fraction, Gini, entropy, and
the aux and z losses, which keep their graph — go to the model's `RoutingCollector` under the
layer's index. The model reads them back after its layers ran: on device, no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ava.model.losses import entropy, gini, load_balancing_loss, routed_counts, router_z_loss, sequence_balancing_loss


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


def router_stats(logits_TE: torch.Tensor, probs_TE: torch.Tensor, expert_TK: torch.Tensor,
                 dropped_fraction: torch.Tensor, num_experts: int, seq_len: Optional[int] = None) -> RouterStats:
    """The stats (and the aux/z losses, which keep their graph) of one routing decision; with
    `seq_len`, the balance loss is the sequence-wise one (`model.aux_loss_scope=sequence`)."""
    counts_E = routed_counts(expert_TK, num_experts)
    if seq_len is None:
        aux = load_balancing_loss(probs_TE=probs_TE, expert_TK=expert_TK)
    else:
        aux = sequence_balancing_loss(probs_TE=probs_TE, expert_TK=expert_TK, seq_len=seq_len)
    return RouterStats(
        tokens_per_expert=counts_E,
        dropped_fraction=dropped_fraction.detach(),
        aux_loss=aux,
        z_loss=router_z_loss(logits_TE=logits_TE),
        gini=gini(counts_E),
        entropy=entropy(counts_E),
    )


class RoutingCollector:
    """One forward pass's `RouterStats`, by layer index. `begin()` starts a pass, each MoE layer
    `record()`s, `take()` returns them in layer order and checks that every expected layer
    reported (a swapped-in layer that does not feed the collector is an error, not a silent
    gap in the losses). A recomputation under activation checkpointing records again after
    `take()`; the next `begin()` drops that."""

    def __init__(self) -> None:
        self._stats: dict[int, RouterStats] = {}

    def begin(self) -> None:
        self._stats = {}

    def record(self, layer_index: int, stats: RouterStats) -> None:
        self._stats[layer_index] = stats

    def take(self, expected: list[int]) -> list[RouterStats]:
        missing = sorted(set(expected) - set(self._stats))
        if missing:
            raise RuntimeError(f"MoE layers {missing} reported no routing statistics in this forward pass")
        stats, self._stats = self._stats, {}
        return [stats[i] for i in expected]
