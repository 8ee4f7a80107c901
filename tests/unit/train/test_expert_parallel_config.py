"""`trainer.expert_parallel_size`: refused with the setting named before anything starts, the
choice between AutoEP and Ava's sharded layer, and the `expert_parallel` section AutoEP parses."""

from __future__ import annotations

import pytest

from ava.config import ConfigError, DeepSpeedConfig, TrainerConfig, model_preset
from ava.model.transformer import AvaForCausalLM
from ava.train.engine import param_groups
from ava.train.expert_parallel import implementation
from ava.train.plan import make_plan
from ava.train.sharded_moe import expert_parallel_rank

EP_READY = dict(activation="swiglu", bias=False, routing="topk", router_jitter=0.0, capacity_factor=None)


def _plan(ep: int, world: int, stage: int = 2, **model):
    cfg = model_preset("nano", **{**EP_READY, **model})
    trainer = TrainerConfig(expert_parallel_size=ep, micro_batch_size=1, optimizer_impl="torch",
                            precision="fp32")
    return make_plan(trainer, DeepSpeedConfig(config=f"zero{stage}"), cfg, world)


def test_ep_section_names_avas_modules_and_tensors():
    config = _plan(2, 4).ds_config
    section = config["expert_parallel"]
    assert section["enabled"] is True and section["autoep_size"] == 2
    assert section["moe_layer_pattern"] == r"layers\.\d+\.moe"
    assert (section["router_pattern"], section["expert_pattern"]) == ("autoep_gate", "experts")
    assert (section["expert_w1"], section["expert_w2"], section["expert_w3"]) == ("w_gate_up", "w_down", None)
    assert section["top_k"] == model_preset("nano").top_k
    assert "expert_parallel" not in _plan(1, 4).ds_config


@pytest.mark.parametrize("model", [
    {"router_jitter": 0.01}, {"capacity_factor": 1.5}, {"eval_capacity_factor": 2.0},
    {"activation": "gelu", "bias": True}, {"activation": "gelu", "bias": False}, {"routing": "sinkhorn"},
    {"overflow": "residual"},  # never used when dropless, but AutoEP's layer would lose its weights
])
def test_models_autoep_cannot_run_exactly_get_the_sharded_layer(model):
    """AutoEP's layer routes dropless top-k without jitter into SwiGLU experts: any other model
    would train a different function there, so it runs on Ava's layer (no AutoEP section)."""
    assert implementation(model_preset("nano", **EP_READY)) == "autoep"
    assert implementation(model_preset("nano", **{**EP_READY, **model})) == "sharded"
    config = _plan(2, 2, **model).ds_config
    assert "expert_parallel" not in config


@pytest.mark.parametrize(("ep", "world", "model", "stage", "message"), [
    (2, 3, {}, 2, "trainer.expert_parallel_size=2 must divide the world size 3"),
    (3, 3, {}, 2, "trainer.expert_parallel_size=3 must divide model.num_experts=4"),
    (2, 2, {}, 0, "trainer.expert_parallel_size=2 needs ZeRO stage 1, 2 or 3 (DeepSpeed reduces expert gradients "
                  "over the expert-data-parallel group there); deepspeed stage is 0"),
    (2, 2, {"activation": "gelu", "bias": True}, 3,
     "trainer.expert_parallel_size=2 needs ZeRO stage 1 or 2 (this model runs on Ava's expert-parallel layer"),
    (2, 2, {"capacity_factor": 1.5}, 0, "needs ZeRO stage 1 or 2 (DeepSpeed reduces expert gradients"),
])
def test_impossible_expert_parallelism_is_refused_with_the_setting_named(ep, world, model, stage, message):
    with pytest.raises(ConfigError) as err:
        _plan(ep, world, stage, **model)
    assert message in str(err.value)


def test_expert_parallel_size_must_be_positive():
    with pytest.raises(ConfigError, match=r"trainer\.expert_parallel_size=0 must be a positive integer"):
        TrainerConfig(expert_parallel_size=0)


def test_expert_parallel_ranks_follow_deepspeeds_group_layout():
    """`_create_expert_and_data_parallel`: groups of consecutive ranks ({0, 1}, {2, 3} at ep=2 on 4
    ranks) by default, strided ({0, 2}, {1, 3}) with `use_data_before_expert_parallelism`."""
    assert [expert_parallel_rank(r, 4, 2, False) for r in range(4)] == [0, 1, 0, 1]
    assert [expert_parallel_rank(r, 4, 2, True) for r in range(4)] == [0, 0, 1, 1]
    assert [expert_parallel_rank(r, 8, 4, True) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_expert_biases_get_no_weight_decay_like_every_bias():
    """Stacked expert biases are 2-D (`b1 [E, I]`): by name, not by shape, so a GELU model decays
    the same tensors at ep=1 as on the sharded layer (one `[I]` bias per expert)."""
    model = AvaForCausalLM(model_preset("nano", activation="gelu", bias=True))
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = sorted(names[i] for i in groups["no_decay"])
    assert "layers.0.moe.experts.b1" in no_decay and "layers.0.moe.experts.b2" in no_decay
    assert all(n.rsplit(".", 1)[-1] in ("weight", "bias", "b1", "b2") for n in no_decay)
    decay = {names[i] for i in groups["decay"]}
    assert {"layers.0.moe.experts.w1", "layers.0.moe.experts.w2", "layers.0.moe.router.gate.weight"} <= decay
    assert not any(n.endswith((".bias", ".b1", ".b2")) for n in decay)
