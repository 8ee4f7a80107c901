"""Typed configuration schemas for every Hydra config group (one module per group).

Values live in ``conf/*.yaml``; these dataclasses fix the keys and types (so a typo or a wrong
type fails in Hydra with the key named) and hold cross-field validation in ``__post_init__``
(so it also runs under ``python -O``, unlike ``assert``). Every default is stated once, here:
the YAML files only set what differs from it (a test holds them to that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ava.config.checks import ConfigError, one_of, require
from ava.config.data import IGNORE_INDEX, ChatConfig, DataConfig, SourceConfig, TokenizerConfig
from ava.config.model import ModelConfig, UpcycleConfig
from ava.config.runtime import DeepSpeedConfig, LoggerConfig
from ava.config.trainer import HealthConfig, InjectConfig, MonitorConfig, TrainerConfig

__all__ = [
    "IGNORE_INDEX", "AvaConfig", "ChatConfig", "ConfigError", "DataConfig", "DeepSpeedConfig", "HealthConfig",
    "InjectConfig", "LoggerConfig", "ModelConfig", "MonitorConfig", "SourceConfig", "TokenizerConfig", "TrainerConfig",
    "UpcycleConfig",
    "compose", "conf_dir", "model_preset", "one_of", "register_configs", "require", "to_object",
]


@dataclass
class AvaConfig:
    """The root of the composed configuration."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 1234
    # a Hugging Face model directory of a family Ava reads, or an Ava export: the architecture,
    # the weights and the tokenizer come from there (ava.train.init_from)
    init_from: Optional[str] = None
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)

    def __post_init__(self) -> None:
        # checks across groups (each group validated its own fields already)
        if isinstance(self.data, DataConfig) and isinstance(self.model, ModelConfig) \
                and self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if isinstance(self.upcycle, UpcycleConfig) and self.upcycle.num_experts and not self.init_from:
            raise ConfigError(f"upcycle.num_experts={self.upcycle.num_experts} needs init_from=<a dense "
                              "checkpoint> to upcycle")


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
    packaged = Path(__file__).resolve().parents[1] / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


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
