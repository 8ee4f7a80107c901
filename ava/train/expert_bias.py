"""Auxiliary-loss-free balancing (DeepSeek-V3) as a callback: after every applied optimizer
step, each MoE router's `balance_bias` moves by `model.bias_update_rate` towards balance, from the
tokens per expert the router chose in that step, summed over all micro-batches and ranks (one
all-reduce per step), so every rank applies the same update and the biases stay identical.

The bias is a buffer of the router: DeepSpeed's checkpoints and Ava's export carry it with the
module, so resume and rollback restore it exactly and this callback keeps no state of its own.
Its name, `balance_bias`, avoids "expert": DeepSpeed's `_save_moe_checkpoint` files every key of
an MoE layer that contains "expert" as a per-expert tensor and fails on one that is not.
"""

from __future__ import annotations

from typing import Any, List

import torch

from ava import dist
from ava.model.router import Router, update_expert_bias
from ava.observe.callbacks import Callback, StepOutput, TrainState


class ExpertBiasCallback(Callback):
    name = "expert_bias"

    def __init__(self, routers: List[Router], layer_ids: List[int], rate: float, device: Any) -> None:
        if any(r.balance_bias is None for r in routers):
            raise ValueError("every router needs a balance_bias buffer (model.expert_bias=true)")
        self.routers, self.layer_ids, self.rate = routers, layer_ids, rate
        self.load_LE = torch.zeros(len(routers), routers[0].gate.out_features, device=device)

    def pre_step(self, state: TrainState) -> None:
        self.load_LE.zero_()

    def post_micro_batch(self, state: TrainState, router_stats: List[Any]) -> None:
        self.load_LE += torch.stack([s.tokens_per_expert.float() for s in router_stats])

    def post_step(self, state: TrainState, output: StepOutput) -> None:
        if not output.applied:  # a skipped step changes nothing, the bias included
            return
        dist.all_reduce_sum(self.load_LE)
        with torch.no_grad():
            for router, load_E in zip(self.routers, self.load_LE, strict=True):
                update_expert_bias(router.balance_bias, load_E, self.rate)
        if output.log_step:
            for layer, router in zip(self.layer_ids, self.routers, strict=True):
                output.metrics[f"moe/layer{layer}/expert_bias"] = router.balance_bias.tolist()


def expert_bias_callback(module: Any, layer_ids: List[int], rate: float, device: Any) -> ExpertBiasCallback:
    """The callback for the engine's module (`layers[i].moe.router`, Ava's or the sharded layer)."""
    routers = [block.moe.router for block in module.layers if block.moe is not None]
    return ExpertBiasCallback(routers, layer_ids, rate, device)
