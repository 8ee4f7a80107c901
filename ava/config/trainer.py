"""`trainer`: the training loop, gradient health and the monitors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from ava.config.checks import one_of, require

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZER_IMPLS = ("auto", "deepspeed", "torch")


INJECT_KINDS = ("nan_grad", "loss_spike", "kill_during_save", "exit")


@dataclass
class InjectConfig:
    """Fault injection for tests and fault drills only: never set it in a real run.

    `kind: nan_grad` sets one element of one gradient to NaN (a tensor hook on the first
    parameter whose name contains `param`, on rank `rank`); `kind: loss_spike` multiplies that
    rank's loss by `scale` before backward; `kind: kill_during_save` sends SIGKILL to rank `rank`
    while it saves the checkpoint of a step in `steps` (its shards written, the manifest not yet);
    `kind: exit` ends rank `rank` with `os._exit(1)` at the start of a step in `steps` (a crashed
    rank). `steps` are 1-based data-window numbers: the count of
    optimizer steps attempted in this run (skipped and rolled-back ones included), which equals
    the logged step until the first rollback. A rollback does not rewind the data, so an injected
    fault, like a bad batch, is not seen again.
    """

    kind: Optional[str] = None  # null | nan_grad | loss_spike | kill_during_save | exit
    steps: List[int] = field(default_factory=list)
    scale: float = 1000.0
    param: str = "experts"
    rank: int = 0

    def __post_init__(self) -> None:
        if self.kind is not None:
            one_of("trainer.health.inject.kind", self.kind, INJECT_KINDS)
        require(all(s > 0 for s in self.steps),
                 f"trainer.health.inject.steps={list(self.steps)} must be positive step numbers")
        require(self.scale > 0, f"trainer.health.inject.scale={self.scale} must be positive")


@dataclass
class HealthConfig:
    """Gradient health monitor (ava/train/health.py): skip unhealthy steps, back off the LR,
    roll back after repeated incidents, stop after too many rollbacks."""

    enabled: bool = True
    ema_decay: float = 0.98  # weight of the old mean/variance in the exponential moving stats
    warmup_steps: int = 50  # healthy steps observed before spike detection starts
    loss_z_threshold: Optional[float] = 6.0  # loss spike: z-score above this; null disables
    grad_z_threshold: Optional[float] = 8.0  # grad-norm spike: z-score above this; null disables
    min_std_fraction: float = 0.01  # std floor as a fraction of |mean| (a flat series is no spike)
    lr_backoff: float = 0.5  # LR multiplier applied after every incident (compounds)
    min_lr_multiplier: float = 0.01  # floor of the compounded multiplier
    recovery_after: int = 20  # healthy steps after an incident before the LR starts recovering
    recovery_steps: int = 50  # steps of the linear ramp from the backed-off LR to the schedule
    rollback_after: int = 3  # consecutive incidents that trigger a rollback (K); 0 disables
    max_rollbacks: int = 3  # rollbacks allowed (M); one more stops the run with a diagnosis
    worst_layers: int = 5  # per-parameter gradient norms recorded in an incident
    inject: InjectConfig = field(default_factory=InjectConfig)

    def __post_init__(self) -> None:
        require(0.0 < self.ema_decay < 1.0,
                 f"trainer.health.ema_decay={self.ema_decay} must be in (0, 1)")
        for key in ("loss_z_threshold", "grad_z_threshold"):
            value = getattr(self, key)
            require(value is None or value > 0,
                     f"trainer.health.{key}={value} must be positive, or null to disable")
        require(0.0 < self.lr_backoff <= 1.0,
                 f"trainer.health.lr_backoff={self.lr_backoff} must be in (0, 1]")
        require(0.0 < self.min_lr_multiplier <= 1.0,
                 f"trainer.health.min_lr_multiplier={self.min_lr_multiplier} must be in (0, 1]")
        require(self.min_std_fraction >= 0,
                 f"trainer.health.min_std_fraction={self.min_std_fraction} must be >= 0")
        for key in ("warmup_steps", "recovery_after", "rollback_after", "max_rollbacks",
                    "worst_layers"):
            value = getattr(self, key)
            require(value >= 0, f"trainer.health.{key}={value} must be >= 0")
        require(self.recovery_steps > 0,
                 f"trainer.health.recovery_steps={self.recovery_steps} must be positive")


@dataclass
class MonitorConfig:
    """Memory, throughput/MFU and expert-utilisation monitors (ava/observe)."""

    memory_warn_fraction: float = 0.9  # warn when host RSS or accelerator memory passes this
    dead_expert_steps: int = 100  # an expert with no tokens over this many steps is dead
    collapse_gini: float = 0.8  # router collapse: Gini / its top-k maximum above this ...
    collapse_steps: int = 100  # ... for this many steps (or any dead expert) raises an alert
    peak_tflops: Optional[float] = None  # per-device peak for MFU; null: the built-in bf16 table
    sync_timing: bool = True  # accelerators: synchronise at phase ends on log steps (exact split)

    def __post_init__(self) -> None:
        require(0.0 < self.memory_warn_fraction <= 1.0,
                 f"trainer.monitor.memory_warn_fraction={self.memory_warn_fraction} must be in (0, 1]")
        for key in ("dead_expert_steps", "collapse_steps"):
            value = getattr(self, key)
            require(value > 0, f"trainer.monitor.{key}={value} must be a positive integer")
        require(0.0 < self.collapse_gini <= 1.0,
                 f"trainer.monitor.collapse_gini={self.collapse_gini} must be in (0, 1]")
        require(self.peak_tflops is None or self.peak_tflops > 0,
                 f"trainer.monitor.peak_tflops={self.peak_tflops} must be positive or null")


@dataclass
class TrainerConfig:
    """The training loop: batch geometry, AdamW + warmup/cosine, evaluation, checkpoints."""

    max_steps: int = 2000  # optimizer steps
    micro_batch_size: int = 8  # sequences per rank per forward pass
    grad_accum_steps: int = 1
    global_batch_size: Optional[int] = None  # null: micro x accum x world; set: must equal it
    precision: str = "bf16"  # fp32 | bf16 | fp16
    optimizer_impl: str = "auto"  # auto | deepspeed | torch (see ava/train/engine.py)
    lr: float = 6e-4  # peak learning rate, reached after warmup_steps
    min_lr: float = 6e-5  # floor of the cosine decay
    warmup_steps: int = 100
    decay_steps: Optional[int] = None  # end of the cosine; null: max_steps
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clipping; 0 disables
    eval_every: int = 250  # steps between validation passes; 0 disables
    eval_batches: int = 20  # micro-batches per rank in one validation pass
    eval_at_start: bool = True  # a validation pass before the first step (the baseline)
    log_every: int = 10  # steps between log lines
    progress_bar: bool = True  # rank 0, interactive terminals only
    save_every: int = 500  # steps between checkpoints; 0: only at the end
    save_at_end: bool = True
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    resume: str = "auto"  # auto | never | a checkpoint tag or directory
    verify_checkpoints: bool = True  # resume/rollback check every file's sha256 (false: sizes)
    allow_data_change: bool = False  # resume even if the data fingerprint differs from the saved one
    # resume a checkpoint saved by another number of ranks (DeepSpeed universal checkpoint; ava/train/elastic.py)
    elastic: bool = False
    dist_timeout_s: int = 1800  # process-group timeout: a lost rank ends the run within this
    deterministic: bool = False  # torch.use_deterministic_algorithms
    # torch.compile each transformer block (ava/train/compile.py); null: on for GPUs, off on CPUs,
    # where it does not pay (README, Performance)
    compile: Optional[bool] = None
    # glibc malloc_trim after every this many steps (0: never): the freed, routing-shaped
    # activations of a step go back to the OS instead of piling up (ava/train/host_memory.py)
    trim_host_memory_every: int = 1
    expert_parallel_size: int = 1  # ranks that share one copy of each layer's experts (DeepSpeed AutoEP)
    health: HealthConfig = field(default_factory=HealthConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # your own ava.observe.Callback subclasses, each {_target_: module.Class, <kwargs>} (Hydra
    # instantiate); they run after Ava's monitors and before checkpointing and the sinks
    callbacks: List[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_batches",
                    "log_every", "keep_last", "dist_timeout_s", "expert_parallel_size"):
            value = getattr(self, key)
            require(value > 0, f"trainer.{key}={value} must be a positive integer")
        for key in ("warmup_steps", "eval_every", "save_every", "trim_host_memory_every"):
            value = getattr(self, key)
            require(value >= 0, f"trainer.{key}={value} must be >= 0")
        require(self.global_batch_size is None or self.global_batch_size > 0,
                 f"trainer.global_batch_size={self.global_batch_size} must be positive or null")
        require(self.decay_steps is None or self.decay_steps > 0,
                 f"trainer.decay_steps={self.decay_steps} must be positive or null")
        one_of("trainer.precision", self.precision, PRECISIONS)
        one_of("trainer.optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        require(self.lr > 0, f"trainer.lr={self.lr} must be positive")
        require(0 <= self.min_lr <= self.lr,
                 f"trainer.min_lr={self.min_lr} must be in [0, trainer.lr={self.lr}]")
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            require(0 <= value < 1, f"trainer.{key}={value} must be in [0, 1)")
        for key in ("adam_eps", "weight_decay", "grad_clip"):
            value = getattr(self, key)
            require(value >= 0, f"trainer.{key}={value} must be >= 0")
        require(bool(self.resume), "trainer.resume must be auto, never, or a checkpoint path")
