"""Expert parallelism (`trainer.expert_parallel_size` = ep > 1) on DeepSpeed.

Each group of ep ranks splits every layer's experts (rank r of the group holds experts
`[r·E/ep, (r+1)·E/ep)`) and exchanges tokens with an all-to-all; everything else stays data
parallel under ZeRO. Two implementations, chosen by the model, both computing exactly the
function Ava trains at ep=1 and exports:

- `autoep`: DeepSpeed's AutoEP, for SwiGLU experts with dropless, jitter-free top-k routing.
  DeepSpeed detects Ava's `MoELayer`s by the patterns below and replaces each with its own layer:
  a dropless softmax → top-k → renormalise router over the same gate weights, and experts
  sharded from Ava's fused `w_gate_up [E, H, 2I]` / `w_down [E, I, H]`. ZeRO 1, 2 and 3.
- `sharded`: everything else (GELU experts and biases, capacity and overflow, jitter, Sinkhorn):
  Ava's own routing with experts on DeepSpeed's expert-parallel groups
  (`ava.train.sharded_moe`). ZeRO 1 and 2: DeepSpeed refuses such layers under ZeRO-3.
"""

from __future__ import annotations

from typing import Any, Dict

from ava.config import ConfigError, ModelConfig
from ava.train.autoep import GATE_ALIAS

MOE_LAYER_PATTERN = r"layers\.\d+\.moe"  # full module names of Ava's MoE layers


def implementation(model: ModelConfig) -> str:
    """`autoep` where AutoEP's layer is this model's exact function, `sharded` otherwise."""
    exact = (model.activation == "swiglu" and model.routing == "topk" and model.router_jitter == 0.0
             and model.capacity_factor is None and model.eval_capacity_factor is None
             # `residual` overflow and shared experts are dense FFNs that AutoEP's layer would drop
             and model.overflow != "residual" and model.shared_experts == 0
             # AutoEP's router is softmax -> top-k -> renormalise, unscaled
             and model.router_score == "softmax" and model.normalize_top_k
             and model.routed_scaling_factor == 1.0 and model.aux_loss_scope == "batch"
             and not model.expert_bias)
    return "autoep" if exact else "sharded"


def check_expert_parallel(model: ModelConfig, ep: int, world_size: int, zero_stage: int) -> None:
    """Fail before start, naming the setting, when ep cannot run this model on this world."""
    if ep == 1:
        return
    key = f"trainer.expert_parallel_size={ep}"
    if world_size % ep:
        raise ConfigError(f"{key} must divide the world size {world_size}")
    if model.num_experts % ep:
        raise ConfigError(f"{key} must divide model.num_experts={model.num_experts} (each rank holds "
                          "the same number of experts)")
    stages = (1, 2, 3) if implementation(model) == "autoep" else (1, 2)
    if zero_stage not in stages:
        why = ("DeepSpeed reduces expert gradients over the expert-data-parallel group there" if zero_stage == 0 else
               "this model runs on Ava's expert-parallel layer (it is not SwiGLU with dropless, jitter-free "
               "renormalised softmax top-k routing and no shared experts, which DeepSpeed AutoEP needs "
               "for ZeRO-3), and DeepSpeed refuses such layers "
               "under ZeRO-3")
        listed = f"{', '.join(map(str, stages[:-1]))} or {stages[-1]}"
        raise ConfigError(f"{key} needs ZeRO stage {listed} ({why}); "
                          f"deepspeed stage is {zero_stage}")


def autoep_section(model: ModelConfig, ep: int) -> Dict[str, Any]:
    """The DeepSpeed config's `expert_parallel` section for Ava's module and tensor names."""
    return {
        "enabled": True,
        "autoep_size": ep,
        "moe_layer_pattern": MOE_LAYER_PATTERN,
        "router_pattern": GATE_ALIAS,
        "expert_pattern": "experts",
        "expert_w1": "w_gate_up",
        "expert_w2": "w_down",
        "expert_w3": None,  # gate and up are fused in w1
        "top_k": model.top_k,
        "score_func": "softmax",
        "route_norm": True,
        "score_apply": "post",
    }


def describe_local_experts(module: Any, ep: int, impl: str) -> str:
    """One log line (an error if no layer was made expert-parallel): which experts this rank
    holds and the shapes of its expert tensors (those DeepSpeed marks `allreduce=False`), read
    from the parameters themselves."""
    import deepspeed.comm as dist

    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()
              if getattr(p, "allreduce", True) is False}
    layers = [m for _, m in module.named_modules() if hasattr(m, "num_local_experts") and hasattr(m, "ep_rank")]
    if not layers:
        raise ConfigError(f"trainer.expert_parallel_size={ep}: no expert-parallel layer replaced those matching "
                          f"{MOE_LAYER_PATTERN!r}; refusing to train data-parallel instead")
    first = layers[0]
    start = first.ep_rank * first.num_local_experts
    listed = ", ".join(f"{n} {list(s)}" for n, s in list(shapes.items())[:3])
    end = start + first.num_local_experts
    return (f"expert parallel ({impl}): ep={ep}, rank {dist.get_rank()} holds experts [{start}, {end}) of "
            f"{first.num_experts} in each of {len(layers)} layers: {listed}")
