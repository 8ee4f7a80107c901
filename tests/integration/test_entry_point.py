"""The Hydra entry point: clear, fast failures; torchrun; one run directory for all ranks;
`--multirun` sweeps."""

from __future__ import annotations

import itertools
import json
import os
import signal
import stat
import subprocess

import pytest

from ava.config import ConfigError, DeepSpeedConfig, TrainerConfig
from ava.train.ds_config import build_ds_config
from ava.train.schedule import lr_at


def assert_clean_failure(run, *fragments: str) -> None:
    assert run.returncode != 0, run.output[-4000:]
    for fragment in fragments:
        assert fragment in run.output, f"{fragment!r} not in:\n{run.output[-4000:]}"
    assert "Traceback" not in run.output, run.output[-4000:]
    assert "data:" not in run.output  # failed before any data was prepared


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("trainer.bogus=1", "Key 'bogus' not in 'TrainerConfig'"),
    ("+trainer.bogus=1", "unknown config key(s): trainer.bogus (TrainerConfig has no field "
                         "'bogus')"),
    ("trainer.lr=abc", "Value 'abc' of type 'str' could not be converted to Float"),
    ("trainer.precision=fp8", "trainer.precision='fp8' is not supported; expected one of "
                              "['fp32', 'bf16', 'fp16']"),
])
def test_bad_config_fails_fast_with_the_key_named(trainer, tmp_path, override, message):
    run = trainer.run(tmp_path / "run", [override], nproc=1, launcher="python")
    assert_clean_failure(run, message)


@pytest.mark.slow
def test_batch_size_mismatch_fails_before_start_naming_all_four(trainer, tmp_path):
    run = trainer.run(tmp_path / "run", ["trainer.global_batch_size=12",
                                         "trainer.micro_batch_size=4",
                                         "trainer.grad_accum_steps=2"],
                      launcher="deepspeed")  # torchrun prints its own traceback on a failed child
    assert_clean_failure(
        run, "batch size mismatch: train batch size 12 (trainer.global_batch_size) != micro "
             "batch size 4 (trainer.micro_batch_size) x gradient accumulation 2 "
             "(trainer.grad_accum_steps) x world size 2 = 16")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_batch_mismatch_from_a_deepspeed_override():
    with pytest.raises(ConfigError, match=r"train batch size 7 \(deepspeed.overrides"):
        build_ds_config(TrainerConfig(micro_batch_size=2, grad_accum_steps=2),
                        DeepSpeedConfig(config="zero1", overrides={"train_batch_size": 7}),
                        world_size=2, use_ds_optimizer=False)


def test_ds_config_is_filled_from_the_trainer():
    trainer = TrainerConfig(micro_batch_size=3, grad_accum_steps=2, grad_clip=0.5,
                            precision="bf16", lr=1e-3)
    ds = build_ds_config(trainer, DeepSpeedConfig(
        config="zero3", overrides={"zero_optimization.stage3_max_live_parameters": 5,
                                   "zero_optimization": {"overlap_comm": False}}),
        world_size=4, use_ds_optimizer=True)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["lr"] == 1e-3
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_max_live_parameters"] == 5
    assert zero["overlap_comm"] is False


def test_schedule_warmup_cosine_min_lr():
    kw = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "decay_steps": 110}
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


@pytest.mark.slow
def test_torchrun_ranks_agree_on_one_run_dir(trainer, tmp_path):
    # no hydra.run.dir: the default outputs/${ava_now:...} must resolve to one directory
    run = trainer.run(None, ["deepspeed=zero1", "trainer.max_steps=3", "trainer.save_every=0",
                             "trainer.eval_every=0", "logger=wandb"],  # WANDB_MODE=offline
                      launcher="torchrun", cwd=tmp_path)
    run.check()
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    tag = run_dirs[0] / "checkpoints" / "step_00000003"
    assert {p.name for p in tag.glob("ava_rank_*.pt")} == {"ava_rank_00000.pt",
                                                           "ava_rank_00001.pt"}
    assert (tag / "COMPLETE.json").is_file() and (run_dirs[0] / ".hydra").is_dir()
    assert (run_dirs[0] / "wandb").is_dir() and (run_dirs[0] / "wandb_state.json").is_file()
    assert_shared_files_follow_the_umask(run_dirs[0])
    log = (run_dirs[0] / "train.log").read_text()  # the preparation report is part of the run's log
    assert f"data: 1 source(s): {trainer.corpus} (txt)" in log
    assert "data validation: records read 400, kept 400, skipped 0" in log
    assert json.loads((run_dirs[0] / "status.json").read_text())["status"] == "finished"


def assert_shared_files_follow_the_umask(run_dir) -> None:
    """What colleagues read from a run directory (checkpoints, tokenizer, logs, metrics) has the
    modes a plain open() gives under this process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    shared = [run_dir / n for n in ("tokenizer.json", "train.log", "metrics.jsonl", "status.json")]
    # DeepSpeed copies its conversion scripts (zero_to_fp32.py, ...) in as executables (u+x)
    shared += [p for p in (run_dir / "checkpoints").rglob("*") if p.suffix != ".py"]
    for path in shared:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == want, f"{path}: {oct(path.stat().st_mode)}"


@pytest.mark.slow
def test_a_missing_data_path_fails_before_any_process_group_on_stderr(trainer, tmp_path):
    proc = subprocess.run(trainer.command([f"hydra.run.dir='{tmp_path / 'run'}'", "data=missing"], nproc=1,
                                          launcher="python"), env=trainer.env(1), capture_output=True,
                          text=True, timeout=120)
    missing = trainer.corpus.parent / "no_such_dir" / "corpus.txt"
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(f"error: data.sources[0]: {str(missing)!r} does not exist")
    assert "error:" not in proc.stdout and "Traceback" not in proc.stderr
    assert "process group:" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130_so_a_shell_chain_stops(trainer, tmp_path):
    run_dir = tmp_path / "run"
    proc = trainer.start(run_dir, ["trainer.max_steps=100000", "trainer.save_every=0", "trainer.eval_every=0",
                                   "trainer.decay_steps=1000"], nproc=1, launcher="python")
    trainer.wait_for_steps(proc, run_dir, 3)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-4000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped" and status["exit_status"] == 130
    step = status["step"]
    assert f"stopped early at step {step} (SIGINT): checkpoint saved; exiting with status 130" in output
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE.json").is_file()
    assert "Traceback" not in output


@pytest.mark.slow
def test_multirun_sweep(trainer, tmp_path):
    run = trainer.run(None, ["-m", "trainer.max_steps=2,3", f"hydra.sweep.dir='{tmp_path}'",
                             "trainer.save_every=0", "trainer.eval_every=0"],
                      nproc=1, launcher="python")
    run.check()
    for job, steps in (("0", 2), ("1", 3)):
        records = [json.loads(line) for line in
                   (tmp_path / job / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in records) == steps
