"""The DeepSpeed config is built from Ava's settings; an override may not choose the precision
behind `trainer.precision`'s back (the logged precision and the engine's would disagree)."""

import pytest

from ava.config import ConfigError, compose, to_object
from ava.train.ds_config import build_ds_config


def _cfg(*overrides: str):
    return to_object(compose(["experiment=smoke", "logger=none", *overrides]))


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.precision=fp32", "+deepspeed.overrides={bf16: {enabled: true}}"],
     "deepspeed.overrides sets bf16.enabled=true: the precision is chosen with trainer.precision "
     "(fp32, bf16 or fp16; now fp32): use trainer.precision=bf16 instead"),
    (["trainer.precision=bf16", "+deepspeed.overrides={bf16: {enabled: false}}"],
     "deepspeed.overrides sets bf16.enabled=false: the precision is chosen with trainer.precision "
     "(fp32, bf16 or fp16; now bf16): use trainer.precision=fp32 instead"),
])
def test_precision_overrides_are_refused_naming_the_setting(overrides, message):
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError) as err:
        build_ds_config(cfg.trainer, cfg.deepspeed, world_size=1, use_ds_optimizer=True)
    assert str(err.value) == message


def test_the_batch_geometry_and_precision_come_from_the_trainer():
    cfg = _cfg("trainer.precision=bf16", "trainer.grad_accum_steps=3")
    config = build_ds_config(cfg.trainer, cfg.deepspeed, world_size=2, use_ds_optimizer=True)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (4 * 3 * 2, 4, 3)
    assert config["bf16"]["enabled"] is True and not (config.get("fp16") or {}).get("enabled")
