"""The run's plan, decided before any process group, model or data exists: the DeepSpeed
config, the optimizer implementation, the batch geometry and the expert-parallel layer.

Everything here needs only the configuration and the world size, so every mistake it can find
ends the run with one clear message (exit code 2) before ranks start talking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from ava.config import ConfigError, DeepSpeedConfig, ModelConfig, TrainerConfig
from ava.train import distributed
from ava.train.ds_config import build_ds_config, deep_merge, load_preset, offloads_optimizer, zero_stage
from ava.train.expert_parallel import autoep_section, check_expert_parallel, implementation

log = logging.getLogger("ava.train")


@dataclass(frozen=True)
class TrainPlan:
    ds_config: Dict[str, Any]
    optimizer_impl: str  # "deepspeed" (DeepSpeed's AdamW) or "torch" (torch.optim.AdamW)
    micro: int  # micro-batch size per rank
    accum: int  # gradient accumulation steps
    world_size: int
    expert_parallel: Optional[str]  # None (ep = 1), "autoep" or "sharded"
    compile: bool = False  # torch.compile each block (`trainer.compile`, resolved)

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)

    def tokens_per_step(self, seq_len: int) -> int:
        return self.micro * self.accum * self.world_size * seq_len


def resolve_optimizer_impl(trainer: TrainerConfig, ds: DeepSpeedConfig) -> str:
    """`trainer.optimizer_impl=auto`: DeepSpeed's AdamW on accelerators and whenever the optimizer
    is offloaded (DeepSpeed requires its CPU-Adam there); torch's foreach AdamW on a CPU-only
    machine, where DeepSpeed's CPU Adam is a C++ op JIT-compiled on first use (minutes, and a
    compiler dependency) and no faster."""
    offload = offloads_optimizer(deep_merge(load_preset(ds.config), dict(ds.overrides)))
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
    """AVX512-BF16 or AMX: without them bf16 matmuls are emulated, far slower than fp32."""
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


def resolve_compile(trainer: TrainerConfig) -> bool:
    """`trainer.compile=null`: on for accelerators, off on CPUs (where it does not pay: README,
    Performance) and with expert parallelism; `true` is checked for what it needs."""
    if trainer.compile is None:
        return distributed.accelerator_name() != "cpu" and trainer.expert_parallel_size == 1
    if trainer.compile and trainer.expert_parallel_size > 1:
        raise ConfigError(
            f"trainer.compile=true cannot be combined with trainer.expert_parallel_size="
            f"{trainer.expert_parallel_size}: the expert-parallel layers exchange tokens with "
            "collectives inside the block that a compiled block cannot trace; use trainer.compile=false")
    if trainer.compile and distributed.accelerator_name() == "cpu":
        check_cpp_compiler()
    return trainer.compile


def check_cpp_compiler() -> None:
    """On CPUs, inductor compiles the graphs as C++: without a compiler the run would fail at
    its first step, after the data preparation."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # inductor's InvalidCxxCompiler names what it searched for
        raise ConfigError(f"trainer.compile=true on a CPU needs a C++ compiler (torch.compile's "
                          f"inductor backend builds the graphs as C++): {exc}".strip()) from exc


def make_plan(trainer: TrainerConfig, ds: DeepSpeedConfig, model: ModelConfig,
              world_size: int) -> TrainPlan:
    """The validated plan for `world_size` ranks (raises `ConfigError` naming the setting)."""
    check_precision(trainer.precision)
    impl = resolve_optimizer_impl(trainer, ds)
    config = build_ds_config(trainer, ds, world_size=world_size, use_ds_optimizer=impl == "deepspeed")
    ep = trainer.expert_parallel_size
    check_expert_parallel(model, ep, world_size, zero_stage(config))
    ep_impl = implementation(model) if ep > 1 else None
    if ep_impl == "autoep":
        config["expert_parallel"] = autoep_section(model, ep)
    return TrainPlan(ds_config=config, optimizer_impl=impl,
                     micro=int(config["train_micro_batch_size_per_gpu"]),
                     accum=int(config["gradient_accumulation_steps"]), world_size=world_size,
                     expert_parallel=ep_impl, compile=resolve_compile(trainer))
