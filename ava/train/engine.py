"""Wrap the plain-PyTorch model in a DeepSpeed engine: param groups, AdamW, schedule.

Optimizer (`trainer.optimizer_impl`):
- `deepspeed`: DeepSpeed's AdamW, named in the DeepSpeed config: FusedAdam on GPUs,
  DeepSpeedCPUAdam when ZeRO offloads the optimizer (`zero3_offload`; DeepSpeed requires it).
- `torch`: `torch.optim.AdamW` passed as a client optimizer (ZeRO 0-3 accept it).
- `auto` (default): `deepspeed` on accelerators and whenever the optimizer is offloaded;
  `torch` on a CPU-only machine without offload. DeepSpeed's CPU FusedAdam is a C++ op that
  is JIT-compiled on first use (~75 s with 2 cores) and is no faster than torch's foreach
  AdamW on a small CPU, so the CPU path avoids the build and any compiler dependency.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ava.config import ConfigError, DeepSpeedConfig, ModelConfig, TrainerConfig
from ava.train import distributed
from ava.train.ds_config import build_ds_config, deep_merge, load_preset, offloads_optimizer, zero_stage
from ava.train.expert_parallel import autoep_section, check_expert_parallel, describe_local_experts, implementation
from ava.train.schedule import warmup_cosine_scheduler

log = logging.getLogger("ava.train")


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups: decay for matrices (incl. 3-D stacked experts), none for norms,
    biases (expert biases included, at any ep) and embeddings (name contains "embed"). Named, because DeepSpeed splits
    expert-parallel parameters out of each group by name."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # experts' biases by name: stacked `b1 [E, I]` is 2-D, one expert's `b1 [I]` (expert parallel) 1-D
        is_bias = name.rsplit(".", 1)[-1] in ("bias", "b1", "b2")
        (no_decay if param.ndim < 2 or is_bias or "embed" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def resolve_optimizer_impl(trainer: TrainerConfig, ds: DeepSpeedConfig) -> str:
    merged = deep_merge(load_preset(ds.config), dict(ds.overrides))
    offload = offloads_optimizer(merged)
    impl = trainer.optimizer_impl
    if impl == "auto":
        impl = "deepspeed" if offload or distributed.accelerator_name() != "cpu" else "torch"
    if impl == "torch" and offload:
        raise ConfigError(
            f"trainer.optimizer_impl=torch cannot be combined with optimizer offload "
            f"(deepspeed.config={ds.config}): DeepSpeed needs its CPU-Adam there; use "
            "trainer.optimizer_impl=auto or deepspeed")
    return impl


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 matmuls are emulated (measured ~100x slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell, stay quiet
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_precision(precision: str) -> None:
    if precision == "fp16" and distributed.accelerator_name() == "cpu":
        raise ConfigError("trainer.precision=fp16 is not supported on CPU (DeepSpeed's fp16 "
                          "optimizer needs a GPU); use bf16 or fp32")
    if precision == "bf16" and distributed.accelerator_name() == "cpu" and not cpu_has_native_bf16():
        log.warning("trainer.precision=bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): bf16 "
                    "matmuls run ~100x slower than fp32 here; consider trainer.precision=fp32")


def plan(trainer: TrainerConfig, ds: DeepSpeedConfig, model: ModelConfig,
         world_size: int) -> Tuple[Dict[str, Any], str]:
    """(DeepSpeed config, optimizer impl), validated before any model or data exists."""
    check_precision(trainer.precision)
    impl = resolve_optimizer_impl(trainer, ds)
    config = build_ds_config(trainer, ds, world_size=world_size,
                             use_ds_optimizer=impl == "deepspeed")
    ep = trainer.expert_parallel_size
    check_expert_parallel(model, ep, world_size, zero_stage(config))
    if ep > 1 and implementation(model) == "autoep":
        config["expert_parallel"] = autoep_section(model, ep)
    return config, impl


def _torch_adamw(groups: List[Dict[str, Any]], **hparams: Any) -> torch.optim.Optimizer:
    """`torch.optim.AdamW` over `groups`, expert-parallel parameters in their own groups (what
    DeepSpeed's ZeRO needs to reduce them over the expert-data-parallel group; a no-op without)."""
    from deepspeed.moe.utils import configure_moe_param_groups

    return torch.optim.AdamW(configure_moe_param_groups(list(groups)), **hparams)


def build_engine(model: nn.Module, trainer: TrainerConfig, ds_config: Dict[str, Any],
                 impl: str) -> Any:
    """`deepspeed.initialize` with Ava's param groups, optimizer and warmup-cosine schedule."""
    import deepspeed

    ep = trainer.expert_parallel_size
    ep_impl = implementation(model.cfg)
    if ep > 1 and ep_impl == "sharded":  # AutoEP replaces the layers inside deepspeed.initialize
        from ava.train.sharded_moe import expert_parallel_rank, shard_experts

        data_before_expert = bool(ds_config.get("use_data_before_expert_parallelism", False))
        shard_experts(model, ep, expert_parallel_rank(torch.distributed.get_rank(),
                                                      torch.distributed.get_world_size(), ep, data_before_expert))
    groups = param_groups(model, trainer.weight_decay)
    decay_steps = trainer.decay_steps or trainer.max_steps
    scheduler = functools.partial(warmup_cosine_scheduler, lr=trainer.lr, min_lr=trainer.min_lr,
                                  warmup_steps=trainer.warmup_steps, decay_steps=decay_steps)
    kwargs: Dict[str, Any] = {"model": model, "config": ds_config, "lr_scheduler": scheduler}
    kwargs["model_parameters"] = groups
    if impl == "torch":
        # a callable: DeepSpeed calls it after AutoEP swapped in its expert parameters
        kwargs["optimizer"] = functools.partial(
            _torch_adamw, lr=trainer.lr, betas=(trainer.adam_beta1, trainer.adam_beta2),
            eps=trainer.adam_eps, weight_decay=trainer.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(**kwargs)
    if ep > 1:
        log.info(describe_local_experts(engine.module, ep, ep_impl))
    log.info("DeepSpeed engine: ZeRO stage %d, %s, optimizer %s (%s)",
             engine.zero_optimization_stage(), trainer.precision, type(optimizer).__name__, impl)
    return engine
