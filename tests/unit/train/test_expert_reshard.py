"""The experts' part of an elastic resume, on synthetic universal-checkpoint folders (the real
conversions run in tests/integration/test_elastic.py and test_expert_parallel.py): AutoEP's layout
round-trips through Ava's, a sharded per-expert layout stacks into Ava's, each target view holds
the rows its EP ranks must load, and `plan_reshard` refuses what it cannot reshard, by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ava.checkpoints import MARKER
from ava.config import ConfigError, compose, to_object
from ava.expert_layout import from_autoep, to_autoep
from ava.train.elastic import plan_reshard
from ava.train.expert_reshard import STATES, canonicalize, read_state, write_target_view

E, H, F = 4, 3, 2  # experts, hidden, expert FFN width (tiny: the layouts are what is tested)
LAYER = "layers.0.moe"


def _folder(zero: Path, name: str, values: dict[str, torch.Tensor], experts: int | None = None) -> None:
    from deepspeed.checkpoint.constants import EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS, PARAM

    (zero / name).mkdir(parents=True)
    for state, tensor in values.items():
        meta = {EP_IS_EXPERT_PARAM: True, EP_NUM_EXPERTS: experts} if experts else {}
        torch.save({PARAM: tensor, **meta}, zero / name / f"{state}.pt")
    torch.save(torch.tensor(3.0), zero / name / "step.pt")


def _states(shape: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {state: torch.randn(shape, generator=gen) for state in STATES}


def test_autoep_layout_round_trips_through_avas():
    w_gate_up, w_down = torch.randn(E, H, 2 * F), torch.randn(E, F, H)
    w1, w2, w3 = to_autoep(w_gate_up, w_down)
    assert (w1.shape, w2.shape, w3.shape) == ((E, F, H), (E, H, F), (E, F, H))
    assert torch.equal(w1[1], w_gate_up[1, :, :F].T) and torch.equal(w3[1], w_gate_up[1, :, F:].T)
    back = from_autoep(w1, w2, w3)
    assert torch.equal(back[0], w_gate_up) and torch.equal(back[1], w_down)


def test_autoep_experts_become_avas_and_its_view_restores_them(tmp_path):
    zero = tmp_path / "zero"
    saved = {name: _states(shape, seed) for seed, (name, shape) in
             enumerate([("w1", (E, F, H)), ("w2", (E, H, F)), ("w3", (E, F, H))])}
    for name, values in saved.items():
        _folder(zero, f"{LAYER}.experts.{name}", values, experts=E)
    torch.save({"param_groups": [{"name": "decay"}]}, zero / "optimizer_state.pt")
    canonicalize(zero, E)
    assert sorted(p.name for p in zero.iterdir()) == [f"{LAYER}.experts.w_down", f"{LAYER}.experts.w_gate_up",
                                                      "optimizer_state.pt"]
    for state in STATES:
        gate_up = read_state(zero / f"{LAYER}.experts.w_gate_up", state)
        assert torch.equal(gate_up, from_autoep(*(saved[w][state] for w in ("w1", "w2", "w3")))[0])
    write_target_view(zero, "autoep", 2, E, [{"name": "decay"}, {"name": "ep_size_2", "moe": True}])
    for name, values in saved.items():
        for state in STATES:
            assert torch.equal(read_state(zero / f"{LAYER}.experts.{name}", state), values[state]), (name, state)
        assert torch.load(zero / f"{LAYER}.experts.{name}" / "fp32.pt", weights_only=False)["ep_num_experts"] == E
    # the engine's expert group gets a saved partner: DeepSpeed's loader pairs groups by position
    groups = torch.load(zero / "optimizer_state.pt", weights_only=False)["param_groups"]
    assert groups == [{"name": "decay"}, {"name": "ep_size_2", "moe": True, "params": []}]


def test_sharded_experts_stack_by_global_index_and_each_slot_gets_its_ep_ranks_rows(tmp_path):
    zero = tmp_path / "zero"
    per_expert = {e: _states((H, F), 10 + e) for e in range(E)}
    for e, values in per_expert.items():
        _folder(zero, f"{LAYER}.deepspeed_moe.experts.deepspeed_experts.{e}.w1", values)
    torch.save({"param_groups": [{"name": "decay"}]}, zero / "optimizer_state.pt")
    canonicalize(zero, E)
    stacked = {s: read_state(zero / f"{LAYER}.experts.w1", s) for s in STATES}
    assert all(torch.equal(stacked[s][e], per_expert[e][s]) for s in STATES for e in range(E))
    assert not list(zero.glob("*deepspeed_experts*"))

    write_target_view(zero, "sharded", 2, E, [{"name": "decay"}])  # slot j of EP rank r: expert 2r + j
    for slot in (0, 1):
        folder = zero / f"{LAYER}.deepspeed_moe.experts.deepspeed_experts.{slot}.w1"
        assert torch.load(folder / "fp32.pt", weights_only=False)["ep_num_experts"] == 2  # one row per EP rank
        for state in STATES:
            rows = read_state(folder, state)
            assert torch.equal(rows[0], per_expert[slot][state]) and torch.equal(rows[1], per_expert[2 + slot][state])
    write_target_view(zero, None, 1, E, [{"name": "decay"}])  # an ep=1 resume later: no stale view left
    assert not list(zero.glob("*deepspeed_experts*"))


def test_a_missing_expert_is_named(tmp_path):
    zero = tmp_path / "zero"
    for e in (0, 1, 3):
        _folder(zero, f"{LAYER}.deepspeed_moe.experts.deepspeed_experts.{e}.b1", _states((F,), e))
    with pytest.raises(ConfigError, match=r"no b1 of experts \[2\] in layers\.0\.moe"):
        canonicalize(zero, E)


def _tag(tmp_path: Path, **manifest) -> Path:
    tag = tmp_path / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (tag / MARKER).write_text(json.dumps({"world_size": 2, "expert_parallel_size": 2, "micro_batch_size": 4,
                                          "grad_accum_steps": 1, "zero_stage": 2, "files": {}, **manifest}))
    return tag


def _cfg(*overrides: str):
    return to_object(compose(["experiment=smoke", "logger=none", "trainer.elastic=true",
                              "trainer.micro_batch_size=4", *overrides]))


def test_plan_reshard_names_old_and_new_world_split_and_accumulation(tmp_path):
    reshard = plan_reshard(_cfg(), _tag(tmp_path), world=1)
    assert reshard is not None and (reshard.world_changed, reshard.moves_experts) == (True, True)
    assert reshard.describe() == ("elastic resume from step_00000004: world size 2 -> 1, expert_parallel_size 2 -> 1, "
                                  "gradient accumulation 1 -> 2, micro-batch 4: the global batch of 8 stays")
    same = plan_reshard(_cfg("trainer.expert_parallel_size=2"), _tag(tmp_path / "b"), world=2)
    assert same is None  # nothing to reshard


def test_plan_reshard_refuses_expert_parallelism_under_zero3(tmp_path):
    tag = _tag(tmp_path, zero_stage=3)
    with pytest.raises(ConfigError) as err:
        plan_reshard(_cfg("deepspeed=zero3"), tag, world=1)
    assert str(err.value) == (
        f"checkpoint {tag} (saved by 2 rank(s) with expert_parallel_size=2, resumed by 1 with 1): trainer.elastic "
        "reshards expert parallelism under ZeRO stage 1 or 2 only (DeepSpeed 0.19.8 keeps ZeRO-3 experts in its "
        "partition-native AutoEP format, which Ava's expert conversion does not read); relaunch with 2 rank(s) and "
        "trainer.expert_parallel_size=2, or export it with ava-export and start a new run directory")
