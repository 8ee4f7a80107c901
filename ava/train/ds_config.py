"""Build the DeepSpeed config: a `ds_configs/*.json` preset + values from Hydra + overrides.

The JSON presets hold only ZeRO settings. Everything the trainer already knows (batch sizes,
gradient accumulation, clipping, precision, the optimizer's hyper-parameters) is filled in here
from `trainer.*`, so no number is stated twice. `deepspeed.overrides` is merged last and can set
any DeepSpeed key (`deepspeed.overrides.zero_optimization.stage=3` or
`'deepspeed.overrides={zero_optimization.stage: 3}'`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Mapping

from ava.config import ConfigError, DeepSpeedConfig, TrainerConfig


def ds_configs_dir() -> Path:
    """`ds_configs/`: shipped inside the package when installed, else the source tree."""
    packaged = Path(__file__).resolve().parents[1] / "ds_configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "ds_configs"


def load_preset(name_or_path: str) -> Dict[str, Any]:
    """The JSON of preset `name_or_path` (`zero2`, `zero2.json` or a path to a JSON file)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = path.with_suffix(".json")
    if not path.is_file():
        path = ds_configs_dir() / path.name
    if not path.is_file():
        names = sorted(p.stem for p in ds_configs_dir().glob("*.json"))
        raise ConfigError(f"deepspeed.config={name_or_path!r}: no such preset or file; "
                          f"presets: {names}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config: {path}: line {exc.lineno}: {exc.msg}") from exc


def deep_merge(base: Dict[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """`base` updated with `overrides`; nested dicts merge, dotted keys (`a.b`) descend."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        leaf = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = deep_merge(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
    return out


def check_batch(train_batch: int, micro: int, accum: int, world: int, source: str) -> None:
    """Fail before start, naming all four numbers, when `train = micro x accum x world` fails."""
    if train_batch != micro * accum * world:
        raise ConfigError(
            f"batch size mismatch: train batch size {train_batch} ({source}) != micro batch size "
            f"{micro} (trainer.micro_batch_size) x gradient accumulation {accum} "
            f"(trainer.grad_accum_steps) x world size {world} = {micro * accum * world}")


def zero_stage(ds_config: Mapping[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: Mapping[str, Any]) -> bool:
    zero = ds_config.get("zero_optimization", {})
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    return device not in (None, "none")


def build_ds_config(trainer: TrainerConfig, deepspeed_cfg: DeepSpeedConfig, *,
                    world_size: int, use_ds_optimizer: bool) -> Dict[str, Any]:
    """The complete DeepSpeed config dict for this run (validated before any engine exists)."""
    micro, accum = trainer.micro_batch_size, trainer.grad_accum_steps
    if trainer.global_batch_size is not None:
        check_batch(trainer.global_batch_size, micro, accum, world_size,
                    "trainer.global_batch_size")
    config = load_preset(deepspeed_cfg.config)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps", "gradient_clipping", "optimizer", "scheduler",
                "bf16", "fp16"):
        if key in config:
            raise ConfigError(
                f"deepspeed.config={deepspeed_cfg.config!r} sets {key!r}; presets must leave it "
                "to the trainer (trainer.*) or to deepspeed.overrides")
    config.update({
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": trainer.grad_clip,
        "bf16": {"enabled": trainer.precision == "bf16"},
        "fp16": {"enabled": trainer.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1},
    })
    if use_ds_optimizer:
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": trainer.lr, "betas": [trainer.adam_beta1, trainer.adam_beta2],
            "eps": trainer.adam_eps, "weight_decay": trainer.weight_decay}}
    config = deep_merge(config, dict(deepspeed_cfg.overrides))
    for mode in ("bf16", "fp16"):
        # the loop, the health monitor (fp16 overflows) and the log follow trainer.precision
        enabled = bool((config.get(mode) or {}).get("enabled"))
        if enabled != (trainer.precision == mode):
            raise ConfigError(
                f"deepspeed.overrides sets {mode}.enabled={str(enabled).lower()}: the precision is "
                f"chosen with trainer.precision (fp32, bf16 or fp16; now {trainer.precision}): use "
                f"trainer.precision={mode if enabled else 'fp32'} instead")
    train = config.get("train_batch_size")
    micro_o = config.get("train_micro_batch_size_per_gpu")
    accum_o = config.get("gradient_accumulation_steps")
    if (train, micro_o, accum_o) != (micro * accum * world_size, micro, accum):
        # an override changed the geometry: it must still add up, and the loop follows it
        check_batch(int(train), int(micro_o), int(accum_o), world_size,
                    "deepspeed.overrides.train_batch_size")
    return config
