"""`trainer.expert_parallel_size`: refused with the setting named before anything starts, and the
DeepSpeed `expert_parallel` section DeepSpeed's AutoEP parses."""

from __future__ import annotations

import pytest

from ava.config import ConfigError, DeepSpeedConfig, TrainerConfig, model_preset
from ava.train.engine import plan

EP_READY = dict(activation="swiglu", bias=False, routing="topk", router_jitter=0.0, capacity_factor=None)


def _plan(ep: int, world: int, stage: int = 2, **model):
    cfg = model_preset("nano", **{**EP_READY, **model})
    trainer = TrainerConfig(expert_parallel_size=ep, micro_batch_size=1, optimizer_impl="torch",
                            precision="fp32")
    return plan(trainer, DeepSpeedConfig(config=f"zero{stage}"), cfg, world)


def test_ep_section_names_avas_modules_and_tensors():
    config, _ = _plan(2, 4)
    section = config["expert_parallel"]
    assert section["enabled"] is True and section["autoep_size"] == 2
    assert section["moe_layer_pattern"] == r"layers\.\d+\.moe"
    assert (section["router_pattern"], section["expert_pattern"]) == ("router", "experts")
    assert (section["expert_w1"], section["expert_w2"], section["expert_w3"]) == ("w_gate_up", "w_down", None)
    assert section["top_k"] == model_preset("nano").top_k
    assert "expert_parallel" not in _plan(1, 4)[0]


@pytest.mark.parametrize(("ep", "world", "model", "stage", "message"), [
    (2, 3, {}, 2, "trainer.expert_parallel_size=2 must divide the world size 3"),
    (3, 3, {}, 2, "trainer.expert_parallel_size=3 must divide model.num_experts=4"),
    (2, 2, {"router_jitter": 0.01}, 2, "model.router_jitter=0.01 (needs 0.0)"),
    (2, 2, {"capacity_factor": 1.5}, 2, "model.capacity_factor=1.5 (needs None)"),
    (2, 2, {"activation": "gelu", "bias": True}, 2, "model.activation='gelu' (needs 'swiglu')"),
    (2, 2, {"routing": "sinkhorn"}, 2, "model.routing='sinkhorn' (needs 'topk')"),
    (2, 2, {}, 0, "needs ZeRO stage 1, 2 or 3"),
])
def test_impossible_expert_parallelism_is_refused_with_the_setting_named(ep, world, model, stage, message):
    with pytest.raises(ConfigError) as err:
        _plan(ep, world, stage, **model)
    assert message in str(err.value)


def test_expert_parallel_size_must_be_positive():
    with pytest.raises(ConfigError, match=r"trainer\.expert_parallel_size=0 must be a positive integer"):
        TrainerConfig(expert_parallel_size=0)
