"""The fault suite (real DeepSpeed ranks on CPU): config errors stop before any process group
exists, also under `python -O`; a rank that dies ends the whole run within a bounded time and
the last checkpoint still loads; SIGTERM to the launch script saves and exits 143; bad records at
scale are counted exactly; a long run keeps host memory and file descriptors flat.

(kill -9 mid-save, corrupted checkpoints and resume refusals live in test_resume.py; W&B resume
in test_observability.py.)"""

from __future__ import annotations

import json
import random
import signal
import subprocess
from pathlib import Path

import pytest

from ava.data.validate import EMPTY_TEXT, INVALID_UTF8, MALFORMED_JSON, MISSING_FIELD, NON_STRING_FIELD

REPO = Path(__file__).resolve().parents[2]
PROCESS_GROUP_LINE = "process group: gloo, 2 rank(s)"


# ---------------------------------------------------------------- 8. config errors
@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["trainer.global_batch_size=12", "trainer.micro_batch_size=4"],
     "batch size mismatch: train batch size 12 (trainer.global_batch_size) != micro batch size 4 "
     "(trainer.micro_batch_size) x gradient accumulation 1 (trainer.grad_accum_steps) x world "
     "size 2 = 8"),
    (["trainer.max_steps=ten"], "Value 'ten' of type 'str' could not be converted to Integer"),
    (["trainer.max_stepz=10"], "Key 'max_stepz' not in 'TrainerConfig'"),
    (["model.hidden_size=???"], "Missing mandatory value: model.hidden_size"),
    (["trainer.precision=fp16"], "trainer.precision=fp16 is not supported on CPU"),
    (["model.num_experts=2", "model.top_k=3"],
     "model.top_k=3 must not exceed model.num_experts=2"),
    (["model.hidden_size=66"], "model.hidden_size=66 must be divisible by model.num_heads=4"),
], ids=["batch", "type", "unknown", "missing", "fp16_cpu", "top_k", "heads"])
def test_config_error_fails_before_any_process_group_under_python_O(trainer, tmp_path,
                                                                     overrides, message):
    env = {"PYTHONOPTIMIZE": "1"}  # python -O for the launcher and the ranks: asserts are gone
    # the batch arithmetic involves the world size: 2 ranks under DeepSpeed's launcher; the other
    # checks are per process and run in one (a 2-rank launch costs ~20 s each)
    nproc, launcher = (2, "deepspeed") if "world size 2" in message else (1, "python")
    run = trainer.run(tmp_path / "run", overrides, nproc=nproc, launcher=launcher, extra_env=env)
    assert run.returncode == 2, run.output[-4000:]
    assert message in run.output, run.output[-4000:]
    assert "Traceback" not in run.output
    assert "process group:" not in run.output  # no rank got as far as creating it
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------- 3. one rank dies
@pytest.mark.slow
def test_dead_rank_ends_every_process_quickly_and_the_last_checkpoint_loads(trainer, tmp_path):
    run_dir = tmp_path / "run"
    common = ["deepspeed=zero2", "trainer.micro_batch_size=4", "trainer.save_every=3",
              "trainer.eval_every=0", "trainer.decay_steps=100", "trainer.dist_timeout_s=30"]
    proc = trainer.start(run_dir, [*common, "trainer.max_steps=100", "trainer.health.inject.kind=exit",
                                   "trainer.health.inject.steps=[5]", "trainer.health.inject.rank=1"],
                         launcher="deepspeed")  # README: DeepSpeed's launcher stops the others
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("a dead rank left the run hanging:\n" + proc.communicate()[0][-4000:])
    assert proc.returncode != 0, output[-4000:]
    assert PROCESS_GROUP_LINE in output and "timeout 30s" in output
    assert "fault injection: rank 1 exits (os._exit(1)) at step 5" in output
    assert "error: lost contact with another rank" in output  # rank 0: one line, no traceback
    assert "Traceback" not in output
    died = next(i for i, line in enumerate(output.splitlines()) if "rank 1 exits" in line)
    steps_after = [ln for ln in output.splitlines()[died:] if "step 6/" in ln or "step 7/" in ln]
    assert not steps_after, steps_after  # nobody trained on without rank 1
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"

    resumed = trainer.run(run_dir, [*common, "trainer.max_steps=5"]).check()
    assert "resuming from step_00000003 at step 3" in resumed.output
    assert sorted(s for s in resumed.losses() if s > 3) == [4, 5]


# ---------------------------------------------------------------- 4. SIGTERM to the launcher
@pytest.mark.slow
def test_sigterm_to_the_launch_script_saves_and_exits_143(trainer, tmp_path):
    run_dir = tmp_path / "run"
    common = [*trainer.base_overrides(), f"hydra.run.dir='{run_dir}'", "deepspeed=zero2",
              "trainer.micro_batch_size=4", "trainer.decay_steps=1000", "trainer.save_every=0",
              "trainer.eval_every=0"]
    env = trainer.env(2)
    env.update({"NPROC": "2", "MASTER_PORT": str(trainer.free_port())})
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "train.sh"), *common,
                             "trainer.max_steps=100000"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trainer.wait_for_steps(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)  # only the script: it must reach both ranks itself
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, output[-6000:]  # "stopped early": a scheduler requeues it
    assert output.count("SIGTERM received") == 2  # both ranks, each once
    line = next(ln for ln in output.splitlines() if "stopped early at step" in ln)
    step = int(line.split("stopped early at step")[1].split(" ")[1])
    assert "(SIGTERM): checkpoint saved; exiting with status 143" in line
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE.json").is_file()
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["step"], status["exit_status"]) == ("stopped", step, 143)

    resumed = trainer.run(run_dir, ["deepspeed=zero2", "trainer.micro_batch_size=4",
                                    "trainer.decay_steps=1000", "trainer.save_every=0",
                                    "trainer.eval_every=0", f"trainer.max_steps={step + 2}"]).check()
    assert f"resuming from step_{step:08d} at step {step}" in resumed.output
    assert sorted(s for s in resumed.losses() if s > step) == [step + 1, step + 2]


# ---------------------------------------------------------------- 7. bad data at scale
RECORDS = 100_000
BAD_KINDS = {  # 1% of the records: 200 of each kind
    MALFORMED_JSON: lambda i: b'{"text": "unterminated %d\n' % i,
    MISSING_FIELD: lambda i: b'{"body": "record %d has no text field"}\n' % i,
    NON_STRING_FIELD: lambda i: b'{"text": %d}\n' % i,
    EMPTY_TEXT: lambda i: b'{"text": "   "}\n',
    INVALID_UTF8: lambda i: b'{"text": "caf\xe9 %d"}\n' % i,
}


def _big_jsonl(path: Path) -> dict:
    """100k records, 1% bad (every kind, spread at random); returns reason -> first bad line."""
    rng = random.Random(7)
    kinds = [k for k in BAD_KINDS for _ in range(RECORDS // 100 // len(BAD_KINDS))]
    bad_lines = dict(zip(sorted(rng.sample(range(1, RECORDS + 1), len(kinds))),
                         rng.sample(kinds, len(kinds)), strict=True))
    words = ["the", "river", "stone", "garden", "tower", "market", "lantern", "story", "engine",
             "bridge", "forest", "cloud"]
    first = {}
    with open(path, "wb") as f:
        for line in range(1, RECORDS + 1):
            kind = bad_lines.get(line)
            if kind is None:
                text = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
                f.write(json.dumps({"text": text}).encode() + b"\n")
            else:
                first.setdefault(kind, line)
                f.write(BAD_KINDS[kind](line))
    return first


@pytest.mark.slow
def test_one_percent_bad_records_at_scale_are_counted_exactly(trainer, tmp_path):
    data = tmp_path / "big.jsonl"
    first_bad = _big_jsonl(data)
    cache = tmp_path / "cache"
    data_overrides = ["data.name=big", f"data.sources=[{{path:'{data}'}}]",
                      f"data.cache_dir='{cache}'", "data.num_proc=2"]
    run = trainer.run(tmp_path / "run", [*data_overrides, "trainer.max_steps=2", "trainer.eval_every=0",
                                         "trainer.save_every=0"], nproc=1, launcher="python").check()
    report = json.loads(next(cache.rglob("report.json")).read_text())
    per_kind = RECORDS // 100 // len(BAD_KINDS)
    assert report["skipped"] == {kind: per_kind for kind in BAD_KINDS}
    assert report["read"] == RECORDS and report["kept"] == RECORDS - RECORDS // 100
    assert "(1000 records skipped)" in run.output
    assert sorted(run.losses()) == [1, 2]  # and training went on

    strict = trainer.run(tmp_path / "strict", [*data_overrides, "data.strict=true",
                                               f"data.cache_dir='{tmp_path / 'cache2'}'"],
                         nproc=1, launcher="python")
    assert strict.returncode == 2, strict.output[-4000:]
    line, kind = min((line, kind) for kind, line in first_bad.items())
    assert f"{data}:{line}: {kind}" in strict.output
    assert "Traceback" not in strict.output


# ---------------------------------------------------------------- 10. load: a 2,000-step soak
SOAK_STEPS = 2000
RSS_GROWTH_BOUND_MB = 48  # after warm-up; a per-step leak of even 25 KB would exceed it


@pytest.mark.slow
def test_soak_2000_steps_keeps_host_memory_and_file_descriptors_flat(trainer, tmp_path):
    run = trainer.run(tmp_path / "run", [
        "deepspeed=zero2", "trainer.micro_batch_size=2", f"trainer.max_steps={SOAK_STEPS}",
        "trainer.log_every=100", "trainer.save_every=500", "trainer.keep_last=2",
        "trainer.eval_every=500", "trainer.eval_batches=2", "trainer.decay_steps=2000"]).check()
    samples = {r["step"]: r for r in run.metrics() if "mem/host_rss_gb" in r}
    assert sorted(samples) == list(range(100, SOAK_STEPS + 1, 100))
    rss_mb = {s: r["mem/host_rss_gb"] * 1024 for s, r in samples.items()}
    fds = {s: r["mem/open_fds"] for s, r in samples.items()}
    growth = max(rss_mb[s] for s in rss_mb if s >= 600) - rss_mb[600]
    print(f"soak: RSS {rss_mb[600]:.1f} MiB at step 600, growth to the end {growth:.1f} MiB; "
          f"open fds {min(fds.values()):.0f}-{max(fds.values()):.0f}")
    assert growth < RSS_GROWTH_BOUND_MB, rss_mb
    # no descriptor leak: one per checkpoint or evaluation would add 3 by the end, one per step 1,400
    assert max(fds[s] for s in fds if s >= 600) <= fds[600] + 1, fds
    assert len(list((tmp_path / "run" / "checkpoints").glob("step_*"))) == 2
    # DeepSpeed's CPU shared-memory all-reduce (~69 MB of /dev/shm a rank) was never built or mapped
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{trainer.last_port}_*"))
