"""Checkpoints and resume on 2 ranks (ZeRO-2, fp32, CPU): exact continuation of losses, weights
and every piece of training state; interrupted (kill -9) and corrupted saves are never resumed;
another world size or other data is refused. (SIGTERM: test_faults.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    assert_same_training_state(uninterrupted.run_dir, run_dir, 2 * K)


def _states(run_dir: Path, step: int) -> tuple:
    tag = run_dir / "checkpoints" / f"step_{step:08d}"
    # our own test artifacts (DeepSpeed pickles), not untrusted input
    blob = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    ranks = [torch.load(tag / f"ava_rank_{r:05d}.pt", map_location="cpu", weights_only=True)
             for r in (0, 1)]
    return blob, ranks


def _assert_equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(expected_dir: Path, resumed_dir: Path, step: int) -> None:
    """Everything a resume restores equals the uninterrupted run's: step, tokens, LR schedule
    position, health-monitor statistics and counters (skipped steps, incidents, LR multiplier),
    callback state, and per rank the loader position and every RNG state."""
    (blob_a, ranks_a), (blob_b, ranks_b) = _states(expected_dir, step), _states(resumed_dir, step)
    for key in ("step", "tokens_seen", "world_size", "schedule", "data_fingerprint", "health",
                "callbacks", "lr_scheduler"):
        _assert_equal(blob_a[key], blob_b[key], key)
    assert blob_a["health"]["attempts"] == step
    for rank, (a, b) in enumerate(zip(ranks_a, ranks_b, strict=True)):
        _assert_equal(a, b, f"rank{rank}")


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


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    return dst


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_kill9_mid_save_restarts_from_last_complete_and_matches(trainer, uninterrupted, tmp_path):
    """Rank 1 is SIGKILLed while saving step 2K (its shards written, no manifest yet): the run
    dies, the half-written tag is never resumed, and the restart follows the uninterrupted run."""
    run_dir = tmp_path / "run"
    killed = trainer.run(run_dir, [*RESUME, f"trainer.max_steps={2 * K}",
                                   "trainer.health.inject.kind=kill_during_save",
                                   f"trainer.health.inject.steps=[{2 * K}]",
                                   "trainer.health.inject.rank=1"], launcher="deepspeed")
    assert killed.returncode != 0, killed.output[-4000:]
    assert f"fault injection: SIGKILL to rank 1 while saving step {2 * K}" in killed.output
    half = run_dir / "checkpoints" / f"step_{2 * K:08d}"
    assert half.is_dir() and not (half / "COMPLETE.json").exists()
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{K:08d}"

    resumed = trainer.run(run_dir, [*RESUME, f"trainer.max_steps={2 * K}"]).check()
    assert f"step_{2 * K:08d} (step {2 * K}) is incomplete" in resumed.output
    assert f"resuming from step_{K:08d} at step {K}" in resumed.output
    expected = {s: v for s, v in uninterrupted.losses().items() if s > K}
    assert {s: v for s, v in resumed.losses().items() if s > K} == expected


@pytest.mark.slow
def test_corrupted_checkpoint_is_skipped_and_none_left_is_a_clear_error(trainer, uninterrupted,
                                                                        tmp_path):
    # a flipped byte in the newest tag: skipped with a warning naming the file, previous one used
    run_dir = _copy_run(uninterrupted.run_dir, tmp_path / "flipped")
    newest = run_dir / "checkpoints" / f"step_{2 * K:08d}"
    shard = sorted(newest.glob("*optim_states.pt"))[-1]
    _flip_byte(shard)
    run = trainer.run(run_dir, [*RESUME, f"trainer.max_steps={2 * K}"]).check()
    assert f"{shard}: sha256 differs from the manifest's" in run.output
    assert f"resuming from step_{K:08d} at step {K}" in run.output
    expected = {s: v for s, v in uninterrupted.losses().items() if s > K}
    assert run.losses() == expected

    # every complete tag damaged (one truncated, one flipped): refuse, naming both files
    run_dir = _copy_run(uninterrupted.run_dir, tmp_path / "ruined")
    older = run_dir / "checkpoints" / f"step_{K:08d}" / "mp_rank_00_model_states.pt"
    older.write_bytes(older.read_bytes()[:-10])
    newest = run_dir / "checkpoints" / f"step_{2 * K:08d}" / "ava_rank_00001.pt"
    _flip_byte(newest)
    run = trainer.run(run_dir, [*RESUME, f"trainer.max_steps={3 * K}"], launcher="deepspeed")
    assert run.returncode == 2, run.output[-4000:]
    assert "trainer.resume='auto': no intact checkpoint left in" in run.output
    assert f"{newest}: sha256 differs from the manifest's" in run.output
    assert f"{older}: " in run.output and "(truncated or overwritten)" in run.output
    assert "Traceback" not in run.output
    assert not (run_dir / "metrics.jsonl").exists()  # nothing trained, nothing overwritten


@pytest.mark.slow
def test_resume_refuses_another_world_size_stage_or_other_data(trainer, uninterrupted, tmp_path):
    run_dir = _copy_run(uninterrupted.run_dir, tmp_path / "run")
    one_rank = trainer.run(run_dir, [*RESUME, f"trainer.max_steps={3 * K}"], nproc=1,
                           launcher="python")
    assert one_rank.returncode == 2, one_rank.output[-4000:]
    assert (f"checkpoint {run_dir / 'checkpoints' / f'step_{2 * K:08d}'} was saved by 2 rank(s) "
            "and this run has 1: resuming needs the same world size") in one_rank.output

    other_data = trainer.run(run_dir, [*RESUME, f"trainer.max_steps={3 * K}",
                                       "data.val_fraction=0.1"], launcher="deepspeed")
    assert other_data.returncode == 2, other_data.output[-4000:]
    assert "was trained on data with fingerprint" in other_data.output
    assert "set trainer.allow_data_change=true" in other_data.output
    zero3 = [o for o in RESUME if not o.startswith("deepspeed=")] + ["deepspeed=zero3"]
    other_stage = trainer.run(run_dir, [*zero3, f"trainer.max_steps={3 * K}"], launcher="deepspeed")
    assert other_stage.returncode == 2, other_stage.output[-4000:]
    assert (f"checkpoint {run_dir / 'checkpoints' / f'step_{2 * K:08d}'} was saved under ZeRO stage 2 and "
            "this run uses stage 3") in other_stage.output
    assert "Relaunch with deepspeed=zero2" in other_stage.output
    for run in (one_rank, other_data, other_stage):
        assert "Traceback" not in run.output
