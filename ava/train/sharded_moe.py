"""Expert parallelism for the models DeepSpeed's AutoEP cannot run exactly: GELU experts (with
biases), capacity, `next_best`/`residual` overflow, router jitter, Sinkhorn routing, sigmoid
scores, unnormalised or scaled weights, shared experts (kept on every rank, data-parallel).

`ShardedMoELayer` takes a `MoELayer`'s place on each rank and keeps the routing local: the same
`route()` as at ep=1 decides every (token, expert) slot and applies capacity on this rank's
tokens, so the layer computes the same function at any ep. Only the expert FFNs are remote:
kept slots travel to the rank that holds their expert with DeepSpeed's variable-size all-to-all
(`compute_split_plan_from_expert_indices` + `_AllToAllV`, the ones AutoEP uses), each local
expert runs on the rows it received, and the outputs travel back to be weighted and summed per
token.

Why a `deepspeed.moe.layer.MoE` subclass rather than DeepSpeed's MoE layer itself: that layer
brings its own `TopKGate` (capacity padding to `[E, C, H]`, its own top-1/top-2 rules, no biases
on the gate path we export), so it would train another model. Subclassing it is what makes the
engine treat this as an MoE layer: it creates the expert-parallel and expert-data-parallel
groups (`set_deepspeed_parallelism`), ZeRO-1/2 reduces the expert gradients over the
expert-data-parallel group (parameters marked by DeepSpeed's `Experts` container), and each
expert is checkpointed in its own `layer_L_expert_e_*` file. Those file writers find experts by
parameter name, hence the `deepspeed_moe.experts.deepspeed_experts.<i>` path. DeepSpeed refuses
this kind of layer under ZeRO-3, and so does Ava (see `check_expert_parallel`).
"""

from __future__ import annotations

from typing import Optional

import torch
from deepspeed.module_inject.auto_ep_layer import _AllToAllV, compute_split_plan_from_expert_indices
from deepspeed.moe.experts import Experts as DeepSpeedExperts
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from ava.config import ConfigError, ModelConfig
from ava.model.expert_loop import gelu_forward, swiglu_forward
from ava.model.moe import MoELayer, add_residual, add_shared, route, slot_order
from ava.model.transformer import AvaForCausalLM


class ExpertFFN(nn.Module):
    """One expert: the `[E, ...]` tensors of Ava's `Experts` at one index, same names, and the
    same FFN functions as the loop backend (plain autograd over them)."""

    def __init__(self, stacked: dict[str, torch.Tensor], activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.b1: Optional[nn.Parameter] = None  # GELU without biases
        self.b2: Optional[nn.Parameter] = None
        for name, tensor in stacked.items():
            setattr(self, name, nn.Parameter(tensor.detach().clone()))

    def forward(self, x_NH: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return swiglu_forward(x_NH, self.w_gate_up, self.w_down)
        return gelu_forward(x_NH, self.w1, self.w2, self.b1, self.b2)


class ShardedMoELayer(MoE):
    """A `MoELayer` whose experts `[r·E/ep, (r+1)·E/ep)` live on expert-parallel rank r."""

    def __init__(self, layer: MoELayer, ep: int, ep_rank: int) -> None:
        nn.Module.__init__(self)  # not MoE.__init__: it builds DeepSpeed's own gate and dispatcher
        cfg: ModelConfig = layer.cfg
        self.cfg, self.router, self.residual, self.shared = cfg, layer.router, layer.residual, layer.shared
        self.layer_index, self.collector = layer.layer_index, layer.collector
        # the attributes DeepSpeed's engine and checkpoint code read from an MoE layer
        self.ep_size, self.num_experts = ep, cfg.num_experts
        self.num_local_experts = cfg.num_experts // ep
        self.expert_group_name = f"ep_size_{ep}"
        self.use_residual, self.enable_expert_tensor_parallelism = False, False
        self.ep_rank, self.ep_group = ep_rank, None
        first = ep_rank * self.num_local_experts
        stacked = dict(layer.experts.named_parameters())
        # DeepSpeed's container copies one expert per local slot and marks them expert-parallel;
        # each slot then takes its own expert's slice
        template = ExpertFFN({n: t[first] for n, t in stacked.items()}, cfg.activation)
        container = DeepSpeedExperts(template, self.num_local_experts, self.expert_group_name)
        with torch.no_grad():
            for e, slot in enumerate(container.deepspeed_experts, start=first):
                for name, param in slot.named_parameters():
                    param.copy_(stacked[name][e])
        self.deepspeed_moe = nn.ModuleDict({"experts": container})

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe["experts"].deepspeed_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: join (or create) the expert-parallel groups of size ep."""
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size,
                                                    use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        rank = groups._get_expert_parallel_rank(self.expert_group_name)
        if rank != self.ep_rank:
            raise ConfigError(f"trainer.expert_parallel_size={self.ep_size}: DeepSpeed placed this rank at "
                              f"expert-parallel rank {rank}, but its experts were taken for rank {self.ep_rank}")
        self.ep_group = groups._get_expert_parallel_group(self.expert_group_name)

    def forward(self, x_BLH: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x_TH = x_BLH.reshape(-1, x_BLH.shape[-1])
        assignment, stats = route(self.router, self.cfg, x_TH, self.training, x_BLH.shape[-2])
        self.collector.record(self.layer_index, stats)
        num_experts, top_k = self.num_experts, assignment.expert_TK.shape[1]
        key_A, order_S = slot_order(assignment, num_experts)
        order_S = order_S[:int((key_A < num_experts).sum())]  # kept slots by expert; dropped ones stay home
        token_S = order_S // top_k
        plan = compute_split_plan_from_expert_indices(key_A[order_S], num_experts, self.ep_size,
                                                      self.num_local_experts, self.ep_group)
        x_RH = _AllToAllV.apply(self.ep_group, x_TH.index_select(0, token_S), plan.input_splits, plan.output_splits)
        y_RH = self._run_local_experts(x_RH, plan.local_counts_by_source)
        y_SH = _AllToAllV.apply(self.ep_group, y_RH, plan.output_splits, plan.input_splits)
        weight_S = assignment.weight_TK.reshape(-1)[order_S]
        y_TH = torch.zeros_like(x_TH).index_add(0, token_S, y_SH * weight_S[:, None].to(y_SH.dtype))
        y_TH = add_residual(y_TH, x_TH, assignment, self.residual)
        return add_shared(y_TH, x_TH, self.shared).view_as(x_BLH)

    def _run_local_experts(self, x_RH: torch.Tensor, counts_SL: torch.Tensor) -> torch.Tensor:
        """Received rows come grouped by source rank, then by local expert (`counts_SL`); each
        local expert runs once on all its rows, even none, so every expert has a gradient.
        (Stacking the local experts for the loop backend measured no faster: `ava-bench ep`.)"""
        local_R = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=x_RH.device).repeat(counts_SL.shape[0]),
            counts_SL.reshape(-1).to(torch.long), output_size=x_RH.shape[0])
        by_expert = torch.argsort(local_R, stable=True)
        chunks = x_RH.index_select(0, by_expert).split(counts_SL.sum(0).tolist())
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.local_experts, chunks, strict=True)])
        return y.index_select(0, torch.argsort(by_expert))


def expert_parallel_rank(rank: int, world_size: int, ep: int, data_before_expert: bool) -> int:
    """A rank's place in its expert-parallel group, as DeepSpeed's
    `_create_expert_and_data_parallel` will lay the groups out: consecutive ranks by default,
    strided by world/ep with `use_data_before_expert_parallelism`."""
    return rank // (world_size // ep) if data_before_expert else rank % ep


def shard_experts(model: AvaForCausalLM, ep: int, ep_rank: int) -> None:
    """Put a `ShardedMoELayer` in every `MoELayer`'s place (before `deepspeed.initialize`)."""
    for block in model.layers:
        if block.moe is not None:  # dense layers stay data-parallel
            block.moe = ShardedMoELayer(block.moe, ep, ep_rank)
