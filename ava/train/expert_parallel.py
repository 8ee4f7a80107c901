"""Expert parallelism (`trainer.expert_parallel_size` = ep > 1) through DeepSpeed's AutoEP.

Each group of ep ranks splits every layer's experts (rank r of the group holds experts
`[r·E/ep, (r+1)·E/ep)`) and exchanges tokens with an all-to-all; everything else stays data
parallel under ZeRO. DeepSpeed detects Ava's `MoELayer`s by the patterns below and replaces
each with its own layer: a dropless softmax → top-k → renormalise router over the same gate
weights, and SwiGLU experts sharded from Ava's fused `w_gate_up [E, H, 2I]` / `w_down [E, I, H]`.
That router has no capacity, jitter or Sinkhorn, so Ava refuses those settings here rather than
train a different function than the one it would export.
"""

from __future__ import annotations

from typing import Any, Dict

from ava.config import ConfigError, ModelConfig

MOE_LAYER_PATTERN = r"layers\.\d+\.moe"  # full module names of Ava's MoE layers


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
    needs = {
        "model.activation": (model.activation, "swiglu"),
        "model.routing": (model.routing, "topk"),
        "model.router_jitter": (model.router_jitter, 0.0),
        "model.capacity_factor": (model.capacity_factor, None),
    }
    wrong = [f"{name}={value!r} (needs {want!r})" for name, (value, want) in needs.items() if value != want]
    if wrong:
        raise ConfigError(
            f"{key} runs DeepSpeed AutoEP, whose layers route dropless top-k without jitter and have "
            f"SwiGLU experts; this model differs: {'; '.join(wrong)}")
    if zero_stage not in (1, 2, 3):
        raise ConfigError(f"{key} needs ZeRO stage 1, 2 or 3 (DeepSpeed reduces expert gradients "
                          f"over the expert-data-parallel group there); deepspeed stage is {zero_stage}")


def autoep_section(model: ModelConfig, ep: int) -> Dict[str, Any]:
    """The DeepSpeed config's `expert_parallel` section for Ava's module and tensor names."""
    return {
        "enabled": True,
        "autoep_size": ep,
        "moe_layer_pattern": MOE_LAYER_PATTERN,
        "router_pattern": "router",
        "expert_pattern": "experts",
        "expert_w1": "w_gate_up",
        "expert_w2": "w_down",
        "expert_w3": None,  # gate and up are fused in w1
        "top_k": model.top_k,
        "score_func": "softmax",
        "route_norm": True,
        "score_apply": "post",
    }


def describe_local_experts(module: Any, ep: int) -> str:
    """One log line (an error if AutoEP replaced nothing): which experts this rank holds and the
    shapes of its expert tensors (those DeepSpeed marks `allreduce=False`), read from the
    parameters themselves."""
    import deepspeed.comm as dist

    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()
              if getattr(p, "allreduce", True) is False}
    layers = [m for _, m in module.named_modules() if hasattr(m, "num_local_experts") and hasattr(m, "ep_rank")]
    if not layers:
        raise ConfigError(f"trainer.expert_parallel_size={ep}: DeepSpeed AutoEP replaced no layer matching "
                          f"{MOE_LAYER_PATTERN!r}; refusing to train data-parallel instead")
    first = layers[0]
    start = first.ep_rank * first.num_local_experts
    listed = ", ".join(f"{n} {list(s)}" for n, s in list(shapes.items())[:3])
    end = start + first.num_local_experts
    return (f"expert parallel: ep={ep}, rank {dist.get_rank()} holds experts [{start}, {end}) of "
            f"{first.num_experts} in each of {len(layers)} layers: {listed}")
