"""Typed configuration schemas for every Hydra config group.

Values live in ``conf/*.yaml``; these dataclasses fix the keys and types (so a typo or a wrong
type fails in Hydra with the key named) and hold cross-field validation in ``__post_init__``
(so it also runs under ``python -O``, unlike ``assert``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what was expected."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{key}={value!r} is not supported; expected one of {list(allowed)}")


NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")
ROUTINGS = ("topk", "sinkhorn")
OVERFLOWS = ("drop", "next_best", "residual")
EXPERT_BACKENDS = ("auto", "grouped_mm", "loop")


@dataclass
class ModelConfig:
    """Architecture of an Ava MoE transformer (sizes from DESIGN.md's preset table)."""

    name: str = "custom"
    vocab_size: int = 65536
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    ffn_size: int = MISSING
    num_experts: int = MISSING
    top_k: int = 2
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    bias: bool = True
    routing: str = "topk"
    sinkhorn_iters: int = 3
    router_jitter: float = 0.01
    capacity_factor: Optional[float] = 3.0
    eval_capacity_factor: Optional[float] = None
    overflow: str = "drop"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    init_std: float = 0.02
    tie_embeddings: bool = True
    activation_checkpointing: bool = False
    expert_backend: str = "auto"
    # `auto` on a CPU: the per-expert loop from this many routed rows per expert (T·k/E) up, the
    # grouped matmul below it (`ava-bench moe`: the loop wins from ~512 rows, loses at 128)
    loop_min_rows_per_expert: int = 256

    def __post_init__(self) -> None:
        if MISSING in (self.hidden_size, self.num_layers, self.num_heads, self.ffn_size):
            return  # an unfilled schema node inside Hydra; validated once values arrive
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size",
                    "num_experts", "top_k", "max_seq_len", "sinkhorn_iters", "loop_min_rows_per_expert"):
            value = getattr(self, key)
            _require(value > 0, f"model.{key}={value} must be a positive integer")
        _require(self.hidden_size % self.num_heads == 0,
                 f"model.hidden_size={self.hidden_size} must be divisible by "
                 f"model.num_heads={self.num_heads}")
        _require((self.hidden_size // self.num_heads) % 2 == 0,
                 f"model.hidden_size/model.num_heads={self.hidden_size // self.num_heads} "
                 "must be even for rotary embeddings")
        _require(self.top_k <= self.num_experts,
                 f"model.top_k={self.top_k} must not exceed model.num_experts={self.num_experts}")
        _one_of("model.norm", self.norm, NORMS)
        _one_of("model.activation", self.activation, ACTIVATIONS)
        _one_of("model.routing", self.routing, ROUTINGS)
        _one_of("model.overflow", self.overflow, OVERFLOWS)
        _one_of("model.expert_backend", self.expert_backend, EXPERT_BACKENDS)
        _require(not (self.activation == "swiglu" and self.bias),
                 "model.activation='swiglu' experts have no biases; set model.bias=false")
        for key in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, key)
            _require(value is None or value > 0,
                     f"model.{key}={value} must be positive, or null for dropless routing")
        for key in ("router_jitter", "aux_loss_coef", "z_loss_coef"):
            value = getattr(self, key)
            _require(value >= 0, f"model.{key}={value} must be >= 0")
        _require(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class SourceConfig:
    """One input of a dataset: a local path/glob, or a `datasets` reference."""

    path: Optional[str] = None  # file, directory or glob; or a `load_from_disk` directory
    builder: Optional[str] = None  # `datasets.load_dataset(builder, data_files=...)`
    data_files: List[str] = field(default_factory=list)
    format: str = "auto"  # auto | txt | jsonl | json | parquet | csv | arrow
    text_field: str = "text"
    txt_mode: str = "paragraph"  # paragraph: blank-line separated documents; file: one per file
    split: str = "train"
    csv_delimiter: str = ","

    def __post_init__(self) -> None:
        _require((self.path is None) != (self.builder is None),
                 f"data.sources entry {self.path or self.builder!r}: set exactly one of "
                 "`path` (file, directory, glob or saved dataset) and `builder`")
        _one_of("data.sources.format", self.format,
                ("auto", "txt", "jsonl", "json", "parquet", "csv", "arrow"))
        _one_of("data.sources.txt_mode", self.txt_mode, ("paragraph", "file"))
        _require(bool(self.text_field), "data.sources.text_field must not be empty")


@dataclass
class TokenizerConfig:
    """Byte-level BPE: load `path`, or train one on the training split."""

    path: Optional[str] = None
    vocab_size: Optional[int] = None  # default: the model's vocab size
    min_frequency: int = 2
    special_tokens: List[str] = field(default_factory=lambda: ["<|endoftext|>", "<|pad|>"])
    eos_token: str = "<|endoftext|>"  # appended after every document when packing
    pad_token: str = "<|pad|>"

    def __post_init__(self) -> None:
        for key in ("eos_token", "pad_token"):
            token = getattr(self, key)
            _require(token in self.special_tokens,
                     f"data.tokenizer.{key}={token!r} must be listed in "
                     f"data.tokenizer.special_tokens={list(self.special_tokens)}")
        _require(self.min_frequency > 0,
                 f"data.tokenizer.min_frequency={self.min_frequency} must be positive")
        if self.vocab_size is not None:
            # byte-level BPE starts from 256 byte tokens plus the special tokens
            smallest = 256 + len(self.special_tokens)
            _require(self.vocab_size >= smallest,
                     f"data.tokenizer.vocab_size={self.vocab_size} is below the smallest "
                     f"byte-level vocabulary ({smallest}: 256 bytes + special tokens)")


@dataclass
class DataConfig:
    """A named dataset, how to validate it, tokenize it, pack it and cache it."""

    name: str = MISSING
    builtin: Optional[str] = None  # e.g. "python_docs"
    sources: List[SourceConfig] = field(default_factory=list)
    seq_len: int = 256
    val_fraction: float = 0.02
    strict: bool = False
    max_doc_chars: int = 200_000  # longer documents are split, never dropped
    report_examples: int = 5
    num_proc: int = 1
    batch_size: int = 1000  # documents per batch when reading, tokenizing and training BPE
    cache_dir: str = "${oc.env:AVA_CACHE,${oc.env:HOME,.}/.cache/ava}"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        if self.name == MISSING:
            return
        _require(self.seq_len > 0, f"data.seq_len={self.seq_len} must be positive")
        _require(0.0 <= self.val_fraction < 1.0,
                 f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        _require(self.num_proc > 0, f"data.num_proc={self.num_proc} must be positive")
        _require(self.batch_size > 0, f"data.batch_size={self.batch_size} must be positive")
        _require(self.report_examples >= 0,
                 f"data.report_examples={self.report_examples} must be >= 0")
        _require(self.max_doc_chars > 0,
                 f"data.max_doc_chars={self.max_doc_chars} must be positive")
        _require(bool(self.builtin) or bool(self.sources),
                 f"data '{self.name}' names no source: set data.builtin or data.sources")


PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZER_IMPLS = ("auto", "deepspeed", "torch")
LOGGER_BACKENDS = ("wandb", "none")
WANDB_MODES = ("online", "offline", "disabled")


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
            _one_of("trainer.health.inject.kind", self.kind, INJECT_KINDS)
        _require(all(s > 0 for s in self.steps),
                 f"trainer.health.inject.steps={list(self.steps)} must be positive step numbers")
        _require(self.scale > 0, f"trainer.health.inject.scale={self.scale} must be positive")


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
        _require(0.0 < self.ema_decay < 1.0,
                 f"trainer.health.ema_decay={self.ema_decay} must be in (0, 1)")
        for key in ("loss_z_threshold", "grad_z_threshold"):
            value = getattr(self, key)
            _require(value is None or value > 0,
                     f"trainer.health.{key}={value} must be positive, or null to disable")
        _require(0.0 < self.lr_backoff <= 1.0,
                 f"trainer.health.lr_backoff={self.lr_backoff} must be in (0, 1]")
        _require(0.0 < self.min_lr_multiplier <= 1.0,
                 f"trainer.health.min_lr_multiplier={self.min_lr_multiplier} must be in (0, 1]")
        _require(self.min_std_fraction >= 0,
                 f"trainer.health.min_std_fraction={self.min_std_fraction} must be >= 0")
        for key in ("warmup_steps", "recovery_after", "rollback_after", "max_rollbacks",
                    "worst_layers"):
            value = getattr(self, key)
            _require(value >= 0, f"trainer.health.{key}={value} must be >= 0")
        _require(self.recovery_steps > 0,
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
        _require(0.0 < self.memory_warn_fraction <= 1.0,
                 f"trainer.monitor.memory_warn_fraction={self.memory_warn_fraction} must be in (0, 1]")
        for key in ("dead_expert_steps", "collapse_steps"):
            value = getattr(self, key)
            _require(value > 0, f"trainer.monitor.{key}={value} must be a positive integer")
        _require(0.0 < self.collapse_gini <= 1.0,
                 f"trainer.monitor.collapse_gini={self.collapse_gini} must be in (0, 1]")
        _require(self.peak_tflops is None or self.peak_tflops > 0,
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
    dist_timeout_s: int = 1800  # process-group timeout: a lost rank ends the run within this
    deterministic: bool = False  # torch.use_deterministic_algorithms
    expert_parallel_size: int = 1  # ranks that share one copy of each layer's experts (DeepSpeed AutoEP)
    health: HealthConfig = field(default_factory=HealthConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_batches",
                    "log_every", "keep_last", "dist_timeout_s", "expert_parallel_size"):
            value = getattr(self, key)
            _require(value > 0, f"trainer.{key}={value} must be a positive integer")
        for key in ("warmup_steps", "eval_every", "save_every"):
            value = getattr(self, key)
            _require(value >= 0, f"trainer.{key}={value} must be >= 0")
        _require(self.global_batch_size is None or self.global_batch_size > 0,
                 f"trainer.global_batch_size={self.global_batch_size} must be positive or null")
        _require(self.decay_steps is None or self.decay_steps > 0,
                 f"trainer.decay_steps={self.decay_steps} must be positive or null")
        _one_of("trainer.precision", self.precision, PRECISIONS)
        _one_of("trainer.optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        _require(self.lr > 0, f"trainer.lr={self.lr} must be positive")
        _require(0 <= self.min_lr <= self.lr,
                 f"trainer.min_lr={self.min_lr} must be in [0, trainer.lr={self.lr}]")
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            _require(0 <= value < 1, f"trainer.{key}={value} must be in [0, 1)")
        for key in ("adam_eps", "weight_decay", "grad_clip"):
            value = getattr(self, key)
            _require(value >= 0, f"trainer.{key}={value} must be >= 0")
        _require(bool(self.resume), "trainer.resume must be auto, never, or a checkpoint path")


@dataclass
class DeepSpeedConfig:
    """A ZeRO preset from `ds_configs/` plus overrides; the trainer fills batch, LR, precision."""

    config: str = "zero2"  # a name in ds_configs/ (zero0..zero3, zero3_offload) or a JSON path
    overrides: Dict[str, Any] = field(default_factory=dict)  # any DeepSpeed key, dotted or nested

    def __post_init__(self) -> None:
        _require(bool(self.config), "deepspeed.config must name a ds_configs/ preset or a path")


@dataclass
class LoggerConfig:
    """Metric sinks on rank 0: console and JSONL always, W&B when `backend=wandb`."""

    backend: str = "wandb"  # wandb | none
    project: str = "ava"
    entity: Optional[str] = None
    group: Optional[str] = None
    run_name: Optional[str] = None  # null: the run directory's name
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; null: WANDB_MODE, else by API key
    jsonl: bool = True  # <run_dir>/metrics.jsonl (+ events.jsonl: incidents, rollbacks, alerts)
    heatmap_every: int = 100  # steps between expert-load heatmaps (W&B table, JSONL list); 0: off
    # config keys whose values never reach W&B (substring match, case-insensitive)
    redact_keys: List[str] = field(default_factory=lambda: [
        "api_key", "apikey", "access_token", "auth_token", "hf_token", "secret", "password",
        "credential"])

    def __post_init__(self) -> None:
        _one_of("logger.backend", self.backend, LOGGER_BACKENDS)
        _require(self.heatmap_every >= 0, f"logger.heatmap_every={self.heatmap_every} must be >= 0")
        if self.mode is not None:
            _one_of("logger.mode", self.mode, WANDB_MODES)


@dataclass
class AvaConfig:
    """The root of the composed configuration."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 1234


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (YAML files extend these by name)."""
    cs = ConfigStore.instance()
    cs.store(name="ava_schema", node=AvaConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="deepspeed", name="base_deepspeed", node=DeepSpeedConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)


def conf_dir() -> Path:
    """The `conf/` directory: shipped inside the package when installed, else the source tree."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: Optional[List[str]] = None, config_name: str = "config") -> DictConfig:
    """Compose the Hydra configuration outside of `@hydra.main` (tests, tools, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def to_object(cfg: DictConfig) -> Any:
    """Resolve and instantiate the typed dataclasses (runs every `__post_init__` check)."""
    return OmegaConf.to_object(cfg)


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """The `conf/model/<name>.yaml` preset as a validated `ModelConfig`."""
    extra = [f"model.{k}={'null' if v is None else v}" for k, v in overrides.items()]
    cfg = compose([f"model={name}", *extra])
    return to_object(cfg.model)
