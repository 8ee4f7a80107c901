"""DeepSpeed AutoEP's side of the model contract, kept out of the model.

AutoEP replaces each `layers.N.moe` with its own layer, which returns its output tensor alone
and knows nothing of Ava's routing collector. Two pieces make it fit:
- `expose_gates(model)`: AutoEP copies the router weights from `getattr(moe, router_pattern)
  .weight`; Ava's gate is the `nn.Linear` at `moe.router.gate`, so each layer gets a plain
  attribute alias to it (not a registered submodule: parameter names stay as they are).
- `feed_collector(module)`: after `deepspeed.initialize`, a forward hook on every replaced
  layer's gate turns the gate's logits (with their graph) into the same `RouterStats` and
  aux/z losses Ava's own layer records: softmax → top-k is the routing AutoEP applies, and Ava
  allows AutoEP only for dropless, jitter-free top-k routing, so nothing is dropped.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ava.model.router import choose_experts
from ava.model.routing_stats import router_stats

GATE_ALIAS = "autoep_gate"  # the router_pattern AutoEP looks up on each MoE layer
LAYER_INDEX = re.compile(r"layers\.(\d+)\.moe$")


def expose_gates(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if LAYER_INDEX.search(name) and hasattr(module, "router"):
            object.__setattr__(module, GATE_ALIAS, module.router.gate)


def feed_collector(model: nn.Module) -> int:
    """Hook every AutoEP layer of `model` (the engine's module) into `model.routing`; returns how
    many layers were hooked."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    collector = model.routing
    hooked = 0
    for name, module in model.named_modules():
        match = LAYER_INDEX.search(name)
        if not match or not isinstance(module, AutoEPMoELayer):
            continue
        index, num_experts, top_k = int(match.group(1)), int(module.num_experts), int(module.router.top_k)

        def record(gate: nn.Module, inputs: Any, logits_TE: torch.Tensor, index: int = index,
                   num_experts: int = num_experts, top_k: int = top_k) -> None:
            probs_TE, expert_TK, _ = choose_experts(logits_TE, top_k=top_k, routing="topk",
                                                    sinkhorn_iters=0, training=gate.training)
            collector.record(index, router_stats(logits_TE, probs_TE, expert_TK,
                                                 logits_TE.new_zeros(()), num_experts))

        module.router.gate.register_forward_hook(record)
        hooked += 1
    return hooked
