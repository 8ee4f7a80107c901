"""Checkpoints and resume on 2 ranks (ZeRO-2, fp32, CPU): exact continuation, interrupted saves
are never resumed, and SIGTERM saves a checkpoint that a later run continues from."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

# A fixed schedule horizon (decay_steps) so the k-step run and the 2k-step run share one LR
# schedule; checkpoints every 4 steps, evaluation every 4 (evaluation must not disturb resume).
RESUME = ["deepspeed=zero2", "trainer.micro_batch_size=4", "trainer.warmup_steps=2",
          "trainer.decay_steps=8", "trainer.save_every=4", "trainer.keep_last=3",
          "trainer.eval_every=4", "trainer.eval_batches=2"]
K = 4


def final_weights(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    # our own test artifact, written by DeepSpeed with pickled extras: not untrusted input
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def uninterrupted(trainer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    return trainer.run(run_dir, [*RESUME, f"trainer.max_steps={2 * K}"]).check()


@pytest.mark.slow
def test_resume_is_exact(trainer, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    first = trainer.run(run_dir, [*RESUME, f"trainer.max_steps={K}"]).check()
    assert "no complete checkpoint" in first.output
    second = trainer.run(run_dir, [*RESUME, f"trainer.max_steps={2 * K}"]).check()
    assert f"resuming from step_{K:08d} at step {K}" in second.output

    expected = uninterrupted.losses()
    assert sorted(expected) == list(range(1, 2 * K + 1))
    assert second.losses() == expected  # bit-identical, step by step (fp32 CPU, same world)

    a, b = final_weights(uninterrupted.run_dir, 2 * K), final_weights(run_dir, 2 * K)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"parameter {name} differs after resume"


@pytest.mark.slow
def test_incomplete_newest_checkpoint_is_not_resumed(trainer, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted.run_dir / "checkpoints", run_dir / "checkpoints")
    newest = run_dir / "checkpoints" / f"step_{2 * K:08d}"
    # an interrupted save: no completeness marker, a shard cut short
    (newest / "COMPLETE.json").unlink()
    shard = sorted(newest.glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:100])

    run = trainer.run(run_dir, [*RESUME, f"trainer.max_steps={2 * K}"]).check()
    assert "is incomplete" in run.output
    assert f"resuming from step_{K:08d} at step {K}" in run.output
    expected = {s: v for s, v in uninterrupted.losses().items() if s > K}
    assert run.losses() == expected
    marker = json.loads((newest / "COMPLETE.json").read_text())  # saved again, completely
    assert marker["step"] == 2 * K and marker["world_size"] == 2


def _rank_processes(launcher_pid: int) -> list:
    procs = []
    for child in psutil.Process(launcher_pid).children(recursive=True):
        cmd = child.cmdline()
        if any(a.startswith("--local_rank") for a in cmd) and "ava.train" in cmd:
            procs.append(child)
    return procs


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_resume_continues(trainer, tmp_path):
    run_dir = tmp_path / "run"
    common = ["deepspeed=zero2", "trainer.micro_batch_size=4", "trainer.decay_steps=1000",
              "trainer.save_every=0", "trainer.eval_every=0"]
    proc = trainer.start(run_dir, [*common, "trainer.max_steps=100000"])
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-6000:]
    ranks = _rank_processes(proc.pid)
    assert len(ranks) == 2
    for rank in ranks:  # like SLURM preemption: every task gets SIGTERM
        rank.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-6000:]
    assert "SIGTERM received" in output
    line = next(ln for ln in output.splitlines() if "stopped by signal at step" in ln)
    step = int(line.split("stopped by signal at step")[1].split(";")[0])
    tag = run_dir / "checkpoints" / f"step_{step:08d}"
    assert (tag / "COMPLETE.json").is_file()
    assert {p.name for p in tag.glob("ava_rank_*.pt")} == {"ava_rank_00000.pt",
                                                           "ava_rank_00001.pt"}

    resumed = trainer.run(run_dir, [*common, f"trainer.max_steps={step + 2}"]).check()
    assert f"resuming from step_{step:08d} at step {step}" in resumed.output
    losses = resumed.losses()
    assert max(losses) == step + 2 and step + 1 in losses
