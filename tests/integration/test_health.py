"""Gradient health on 2 ranks (CPU, fp32, torchrun): an unhealthy step leaves
parameters and optimizer state bit-identical under ZeRO 0-3, the LR backs off, incidents are
logged; a loss spike is caught by its z-score; K consecutive incidents roll back to the last
checkpoint and training continues; M rollbacks stop the run with a diagnosis."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

import pytest
import torch

COMMON = ["trainer.micro_batch_size=4", "trainer.warmup_steps=1", "trainer.decay_steps=100",
          "trainer.eval_every=0", "trainer.keep_last=20", "trainer.health.warmup_steps=3"]


def records(run_dir: Path) -> Dict[int, Dict]:
    """step -> the last metrics record of that step."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec
    return out


def events(run_dir: Path) -> List[Dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def tensors(obj, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Every tensor in a (nested) checkpoint object, by path."""
    found: Dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        found[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            found.update(tensors(value, f"{prefix}/{key}"))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found.update(tensors(value, f"{prefix}/{i}"))
    return found


def checkpoint_tensors(tag_dir: Path) -> Dict[str, torch.Tensor]:
    """Model weights + optimizer state (master weights, Adam moments and step counters) of every
    rank's DeepSpeed files in a tag (our own test artifacts: pickled by DeepSpeed, trusted)."""
    found: Dict[str, torch.Tensor] = {}
    files = sorted(tag_dir.glob("*model_states.pt")) + sorted(tag_dir.glob("*optim_states.pt"))
    assert files, f"no DeepSpeed files in {tag_dir}"
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=False)
        keep = {k: v for k, v in state.items() if k in ("module", "optimizer", "optimizer_state_dict")}
        found.update(tensors(keep, path.name))
    return found


def assert_identical(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} changed"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_nan_gradient_step_is_skipped_bit_identically(stage, trainer, tmp_path):
    run_dir = tmp_path / "run"
    run = trainer.run(run_dir, [*COMMON, f"deepspeed=zero{stage}", "trainer.max_steps=7",
                                "trainer.save_every=1", "trainer.health.inject.kind=nan_grad",
                                "trainer.health.inject.steps=[3]"]).check()
    assert f"ZeRO stage {stage}" in run.output
    recs = records(run_dir)
    assert sorted(recs) == list(range(1, 8))
    assert [recs[s]["health/skipped"] for s in range(1, 8)] == [0, 0, 1, 0, 0, 0, 0]
    assert recs[3]["train/grad_norm"] in ("nan", "inf")

    # the incident: kind, and the NaN parameter heads the per-parameter gradient norms
    incidents = [e for e in events(run_dir) if e["event"] == "incident"]
    assert [(e["step"], e["kind"]) for e in incidents] == [(3, "nonfinite_grad")]
    name, value = incidents[0]["worst_grad_norms"][0]
    assert "experts" in name and value in ("nan", "inf")
    assert "step 3 skipped: nonfinite_grad" in run.output

    # LR backed off: step 4 runs at half the LR step 3 would have used (the schedule did not
    # advance over the skipped step), then recovers later (recovery_after=20: not yet here)
    assert recs[3]["health/lr_multiplier"] == 0.5
    assert math.isclose(recs[4]["train/lr"], 0.5 * recs[3]["train/lr"], rel_tol=1e-12)

    # parameters and optimizer state after the skipped step 3 == after step 2, bit for bit
    ckpt = run_dir / "checkpoints"
    before, after = checkpoint_tensors(ckpt / "step_00000002"), checkpoint_tensors(ckpt / "step_00000003")
    assert_identical(before, after, f"ZeRO-{stage} skipped step")
    later = checkpoint_tensors(ckpt / "step_00000004")
    assert any(not torch.equal(after[k], later[k]) for k in after), "step 4 changed nothing"
    m2, m3 = (torch.load(sorted((ckpt / tag).glob("*model_states.pt"))[0], weights_only=False)
              for tag in ("step_00000002", "step_00000003"))
    assert m3["skipped_steps"] == m2["skipped_steps"] + 1
    assert m3["lr_scheduler"]["last_epoch"] == m2["lr_scheduler"]["last_epoch"]

    # training continues and learns
    losses = {s: r["train/loss"] for s, r in recs.items()}
    assert all(math.isfinite(losses[s]) for s in range(4, 8))
    assert losses[7] < losses[4] < losses[1]


@pytest.mark.slow
def test_loss_spike_skipped_and_consecutive_incidents_roll_back(trainer, tmp_path):
    """A spike at step 6 is caught by its z-score and skipped; spikes at data windows 9 and 10
    (K=2 in a row) roll back to step_8 and training goes on with fresh data to the end."""
    run_dir = tmp_path / "run"
    run = trainer.run(run_dir, [*COMMON, "deepspeed=zero2", "trainer.max_steps=12",
                                "trainer.save_every=4", "trainer.health.rollback_after=2",
                                "trainer.health.inject.kind=loss_spike",
                                "trainer.health.inject.steps=[6,9,10]"]).check()
    evs = events(run_dir)
    incidents = [(e["step"], e["kind"]) for e in evs if e["event"] == "incident"]
    assert incidents == [(6, "loss_spike"), (9, "loss_spike"), (10, "loss_spike")]
    spike = next(e for e in evs if e["event"] == "incident")
    recs = records(run_dir)
    assert spike["z"] > 6.0 and spike["value"] > 100 * recs[5]["train/loss"]
    rollbacks = [e for e in evs if e["event"] == "rollback"]
    assert [(e["step"], e["to_step"], e["rollbacks"]) for e in rollbacks] == [(10, 8, 1)]
    assert "restored step_00000008 (step 8)" in run.output

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "train/loss" in r]
    assert steps == [*range(1, 11), 9, 10, 11, 12]  # 9 and 10 again, after the rollback
    assert recs[12]["health/rollbacks"] == 1 and recs[12]["health/incidents"] == 3
    assert all(recs[s]["health/skipped"] == 0 for s in (9, 10, 11, 12))  # the re-run steps
    assert recs[12]["train/loss"] < recs[1]["train/loss"]
    assert (run_dir / "checkpoints" / "step_00000012" / "COMPLETE.json").is_file()


@pytest.mark.slow
def test_too_many_rollbacks_stop_with_a_diagnosis(trainer, tmp_path):
    """A fault that persists past the rollback (NaN on every data window from 3 on): the second
    streak exceeds max_rollbacks=1 and the run stops, naming the counts; logger=none: no W&B."""
    run_dir = tmp_path / "run"
    run = trainer.run(run_dir, [*COMMON, "deepspeed=zero2", "trainer.max_steps=12",
                                "trainer.save_every=2", "trainer.health.rollback_after=2",
                                "trainer.health.max_rollbacks=1",
                                "trainer.health.inject.kind=nan_grad",
                                "trainer.health.inject.steps=[3,4,5,6,7,8,9,10]"],
                      launcher="deepspeed")  # torchrun prints its own traceback on exit 3
    assert run.returncode != 0, run.output[-4000:]
    assert "rollback 1/1" in run.output
    assert ("training stopped at step 4: 2 consecutive unhealthy steps after 1 rollback(s) "
            "(trainer.health.max_rollbacks=1, rollback_after=2); 4 incidents in 6 attempted "
            "steps (nonfinite_grad=4)") in run.output
    assert "Traceback" not in run.output
    stop = [e for e in events(run_dir) if e["event"] == "stop"]
    assert len(stop) == 1 and "4 incidents" in stop[0]["text"]
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_state.json").exists()
