"""Wrap the plain-PyTorch model in a DeepSpeed engine: param groups, AdamW, the LR schedule, and
the expert-parallel layer (Ava's sharded layer before `deepspeed.initialize`, AutoEP's inside it).

Optimizer (`trainer.optimizer_impl`, resolved in `ava.train.plan`): DeepSpeed's AdamW named in
the DeepSpeed config, or `torch.optim.AdamW` passed as a client optimizer (ZeRO 0-3 accept it).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Dict, List

import torch
from torch import nn

from ava.config import TrainerConfig
from ava.train import autoep
from ava.train.expert_parallel import describe_local_experts
from ava.train.plan import TrainPlan
from ava.train.schedule import schedule_factory

log = logging.getLogger("ava.train")


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups: decay for matrices (incl. 3-D stacked experts), none for norms, biases
    (expert biases included, at any ep) and embeddings (name contains "embed"). Named, because
    DeepSpeed splits expert-parallel parameters out of each group by name."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # experts' biases by name: stacked `b1 [E, I]` is 2-D, one expert's `b1 [I]` (ep) 1-D
        is_bias = name.rsplit(".", 1)[-1] in ("bias", "b1", "b2")
        ndim = len(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition's own shape is flat
        (no_decay if ndim < 2 or is_bias or "embed" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def _torch_adamw(groups: List[Dict[str, Any]], **hparams: Any) -> torch.optim.Optimizer:
    """`torch.optim.AdamW` over `groups`, expert-parallel parameters in their own groups (what
    DeepSpeed's ZeRO needs to reduce them over the expert-data-parallel group; a no-op without)."""
    from deepspeed.moe.utils import configure_moe_param_groups

    return torch.optim.AdamW(configure_moe_param_groups(list(groups)), **hparams)


def engine_precision(engine: Any) -> str:
    """What the engine actually runs (read back from it, not from the configuration)."""
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp16" if engine.fp16_enabled() else "fp32"


def build_engine(model: nn.Module, trainer: TrainerConfig, plan: TrainPlan) -> Any:
    """`deepspeed.initialize` with Ava's param groups, optimizer and LR schedule."""
    import deepspeed

    ep = trainer.expert_parallel_size
    if plan.expert_parallel == "sharded":
        from ava.train.sharded_moe import expert_parallel_rank, shard_experts

        data_before_expert = bool(plan.ds_config.get("use_data_before_expert_parallelism", False))
        shard_experts(model, ep, expert_parallel_rank(torch.distributed.get_rank(),
                                                      torch.distributed.get_world_size(), ep, data_before_expert))
    elif plan.expert_parallel == "autoep":
        autoep.expose_gates(model)
    kwargs: Dict[str, Any] = {"model": model, "config": plan.ds_config,
                              "lr_scheduler": schedule_factory(trainer),
                              "model_parameters": param_groups(model, trainer.weight_decay)}
    if plan.optimizer_impl == "torch":
        # a callable: DeepSpeed calls it after AutoEP swapped in its expert parameters
        kwargs["optimizer"] = functools.partial(
            _torch_adamw, lr=trainer.lr, betas=(trainer.adam_beta1, trainer.adam_beta2),
            eps=trainer.adam_eps, weight_decay=trainer.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(**kwargs)
    if plan.expert_parallel == "autoep":
        autoep.feed_collector(engine.module)
    if plan.expert_parallel:
        log.info(describe_local_experts(engine.module, ep, plan.expert_parallel))
    log.info("DeepSpeed engine: ZeRO stage %d, %s, optimizer %s (%s)",
             engine.zero_optimization_stage(), engine_precision(engine), type(optimizer).__name__,
             plan.optimizer_impl)
    return engine
