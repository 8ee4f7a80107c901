"""2 ranks under the `deepspeed` launcher, ZeRO 0-3, vs one process with the same global batch."""

from __future__ import annotations

import math

import pytest

# Make the global batch's loss an exact mean of per-rank losses: no capacity (a capacity is
# computed over the tokens of one forward pass, so it differs between 2 x 4 and 1 x 8
# sequences), no load-balancing loss (a product of per-batch means, not a mean) and no router
# jitter (random noise drawn per rank). The LM loss and the z-loss are per-token means.
SAME_GLOBAL_BATCH = [
    "model.capacity_factor=null", "model.router_jitter=0", "model.aux_loss_coef=0",
    "trainer.max_steps=5", "trainer.warmup_steps=1", "trainer.eval_every=0",
    "trainer.save_every=0", "trainer.save_at_end=false",
]

# fp32 tolerance. The two runs compute the same math in a different order: 2 x 4 sequences
# summed by an all-reduce vs 8 in one matmul, DeepSpeed's bucketed (and for ZeRO 1-3
# partitioned) gradient reduction vs none. Each of those is ~1e-7 relative (fp32 epsilon times
# a few reductions); AdamW divides by sqrt(v), which can amplify a tiny gradient difference in a
# near-zero coordinate over the steps. Measured on the reference 2-core box: <= 4e-7 relative
# over 5 steps for every stage; we allow 50x that. A real bug (a wrong gradient average, a lost
# shard, a skipped or doubled step) moves the loss by 1e-3 or more.
RTOL = 2e-5

# ZeRO-3 runs with its blocks compiled (inductor) and checkpointed, against the eager, plain
# single process: the compiled graphs differ from eager by fp32 rounding only (measured: <= 2e-7
# relative over 6 steps at every stage, single process), so the same tolerance holds, and the
# one 2-rank run proves trainer.compile under the stage that gathers parameters in hooks.
EXTRA = {3: ["trainer.compile=true", "model.activation_checkpointing=true"]}


@pytest.fixture(scope="module")
def reference(trainer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single_process")
    run = trainer.run(run_dir, [*SAME_GLOBAL_BATCH, "deepspeed=zero0",
                                "trainer.micro_batch_size=8"], nproc=1, launcher="python")
    return run.check().losses()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_match_single_process(stage, trainer, reference, tmp_path):
    run = trainer.run(tmp_path / "run", [*SAME_GLOBAL_BATCH, f"deepspeed=zero{stage}",
                                         "trainer.micro_batch_size=4", *EXTRA.get(stage, [])],
                      launcher="deepspeed")
    run.check()
    assert f"ZeRO stage {stage}" in run.output
    if stage in EXTRA:  # compiled once, never again (the routing changes every step)
        assert "torch.compile: the first training step took" in run.output
        assert "no recompilation after it" in run.output
        assert "recompil" not in run.output.replace("no recompilation after it", "")
    losses = run.losses()
    assert sorted(losses) == sorted(reference) == [1, 2, 3, 4, 5]
    for step, expected in reference.items():
        assert math.isclose(losses[step], expected, rel_tol=RTOL), (
            f"ZeRO-{stage} step {step}: 2 ranks {losses[step]!r} vs 1 process {expected!r}")
    assert losses[5] < losses[1]  # and it learns
