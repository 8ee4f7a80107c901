"""`deepspeed` and `logger`: the ZeRO preset and the metric sinks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from ava.config.checks import one_of, require

LOGGER_BACKENDS = ("wandb", "none")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class DeepSpeedConfig:
    """A ZeRO preset from `ds_configs/` plus overrides; the trainer fills batch, LR, precision."""

    config: str = MISSING  # a name in ds_configs/ (zero0..zero3, zero3_offload) or a JSON path
    overrides: Dict[str, Any] = field(default_factory=dict)  # any DeepSpeed key, dotted or nested

    def __post_init__(self) -> None:
        if self.config == MISSING:
            return  # an unfilled schema node inside Hydra
        require(bool(self.config), "deepspeed.config must name a ds_configs/ preset or a path")


@dataclass
class LoggerConfig:
    """Metric sinks on rank 0: console and JSONL always, W&B when `backend=wandb`."""

    backend: str = MISSING  # wandb | none (conf/logger/<backend>.yaml)
    project: str = "ava"
    entity: Optional[str] = None
    group: Optional[str] = None
    run_name: Optional[str] = None  # null: the run directory's name
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; null: WANDB_MODE, else by API key
    jsonl: bool = True  # <run_dir>/metrics.jsonl (+ events.jsonl: incidents, rollbacks, alerts)
    heatmap_every: int = 100  # steps between expert-load heatmaps (W&B table + images, JSONL list); 0: off
    report: bool = True  # training ends by writing <run_dir>/report.html (ava-report; needs jsonl)
    # config keys whose values never reach W&B (substring match, case-insensitive)
    redact_keys: List[str] = field(default_factory=lambda: [
        "api_key", "apikey", "access_token", "auth_token", "hf_token", "secret", "password",
        "credential"])

    def __post_init__(self) -> None:
        if self.backend == MISSING:
            return
        one_of("logger.backend", self.backend, LOGGER_BACKENDS)
        require(self.heatmap_every >= 0, f"logger.heatmap_every={self.heatmap_every} must be >= 0")
        if self.mode is not None:
            one_of("logger.mode", self.mode, WANDB_MODES)
