"""Typed configuration schemas for every Hydra config group.

Values live in ``conf/*.yaml``; these dataclasses fix the keys and types (so a typo or a wrong
type fails in Hydra with the key named) and hold cross-field validation in ``__post_init__``
(so it also runs under ``python -O``, unlike ``assert``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

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

    def __post_init__(self) -> None:
        if MISSING in (self.hidden_size, self.num_layers, self.num_heads, self.ffn_size):
            return  # an unfilled schema node inside Hydra; validated once values arrive
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size",
                    "num_experts", "top_k", "max_seq_len", "sinkhorn_iters"):
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


@dataclass
class TokenizerConfig:
    """Byte-level BPE: load `path`, or train one on the training split."""

    path: Optional[str] = None
    vocab_size: Optional[int] = None  # default: the model's vocab size
    min_frequency: int = 2
    special_tokens: List[str] = field(default_factory=lambda: ["<|endoftext|>", "<|pad|>"])


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
    cache_dir: str = "${oc.env:AVA_CACHE,${oc.env:HOME,.}/.cache/ava}"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        if self.name == MISSING:
            return
        _require(self.seq_len > 0, f"data.seq_len={self.seq_len} must be positive")
        _require(0.0 <= self.val_fraction < 1.0,
                 f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        _require(self.num_proc > 0, f"data.num_proc={self.num_proc} must be positive")
        _require(self.max_doc_chars > 0,
                 f"data.max_doc_chars={self.max_doc_chars} must be positive")
        _require(bool(self.builtin) or bool(self.sources),
                 f"data '{self.name}' names no source: set data.builtin or data.sources")


@dataclass
class AvaConfig:
    """The root of the composed configuration."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    seed: int = 1234


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (YAML files extend these by name)."""
    cs = ConfigStore.instance()
    cs.store(name="ava_schema", node=AvaConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)


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
