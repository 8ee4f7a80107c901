"""Elastic resume on 2 CPU ranks (ZeRO-2, fp32): a checkpoint of 2 ranks continues on 1, and one
of 1 rank on 2, through DeepSpeed's universal checkpoint, keeping the global batch (the
accumulation adapts) and the sample order; the losses follow an uninterrupted 2-rank run to fp32
reduction-order tolerance. Without trainer.elastic the change is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

# dropless, no jitter, no balance losses: the loss is a mean of per-token terms, so regrouping the
# global batch into other micro-batches changes only the order of the sums
ELASTIC = ["deepspeed=zero2", "trainer.micro_batch_size=4", "trainer.warmup_steps=2", "trainer.decay_steps=12",
           "trainer.save_every=4", "trainer.keep_last=3", "trainer.eval_every=0", "model.capacity_factor=null",
           "model.router_jitter=0.0", "model.aux_loss_coef=0", "model.z_loss_coef=0"]
REL = 1e-5  # fp32: the regrouped sums round differently; measured: at most 1e-7


def copy_tag(src_run: Path, step: int, dst_run: Path) -> None:
    """A run directory holding only `src_run`'s checkpoint of `step` (and its tokenizer)."""
    tag = f"step_{step:08d}"
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / tag, dst_run / "checkpoints" / tag)
    shutil.copy(src_run / "tokenizer.json", dst_run / "tokenizer.json")


@pytest.mark.slow
def test_resume_on_another_world_size(trainer, tmp_path):
    reference = trainer.run(tmp_path / "ref", [*ELASTIC, "trainer.max_steps=12"]).check().losses()

    one = tmp_path / "one_rank"
    copy_tag(tmp_path / "ref", 4, one)
    refused = trainer.run(one, [*ELASTIC, "trainer.max_steps=8"], nproc=1)
    assert refused.returncode != 0  # torchrun reports the rank's exit 2 as 1
    assert "was saved by 2 rank(s) and this run has 1" in refused.output
    assert "set trainer.elastic=true to reshard it" in refused.output

    down = trainer.run(one, [*ELASTIC, "trainer.max_steps=8", "trainer.elastic=true"], nproc=1).check()
    assert ("elastic resume from step_00000004: world size 2 -> 1, gradient accumulation 1 -> 2, "
            "micro-batch 4: the global batch of 8 stays") in down.output
    assert "RNG streams re-seeded per rank from (seed 1234, step 4, rank)" in down.output
    # the universal checkpoint holds exactly the saved master weights
    saved = torch.load(tmp_path / "ref" / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]  # our own test artifact
    universal = one / "checkpoints" / ".universal" / "step_00000004" / "zero"
    for name, tensor in saved.items():
        fp32 = torch.load(universal / name / "fp32.pt", weights_only=False)  # DeepSpeed wrote it here
        fp32 = fp32["param"] if isinstance(fp32, dict) else fp32  # newer DeepSpeed wraps it with metadata
        assert torch.equal(fp32.view_as(tensor), tensor), name

    two = tmp_path / "two_ranks"
    copy_tag(one, 8, two)
    up = trainer.run(two, [*ELASTIC, "trainer.max_steps=12", "trainer.elastic=true"]).check()
    assert "world size 1 -> 2, gradient accumulation 2 -> 1" in up.output
    resumed = {**down.losses(), **up.losses()}
    assert sorted(resumed) == list(range(5, 13))
    for step in range(5, 13):
        assert resumed[step] == pytest.approx(reference[step], rel=REL), step
