"""`ava-bench gpu`, rehearsed on the CPU: `--dry-run` runs every part of the one-shot GPU
measurement at tiny sizes, each in its own process (the main job as a real one-rank DeepSpeed
ZeRO-2 bf16 run), and writes a row for everything it measured; a part that fails or outlives its
cap is a row with its error while the next part still runs. No timed assertions."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ava.bench import gpu_bench, moe_bench

ROOT = Path(__file__).resolve().parents[3]
ROW_KEYS = {"part", "row", "ms", "tokens_per_s", "flops_per_s", "mfu", "vs_transformers", "notes"}
BF16_LOSS_TOL = 1e-3  # Ava's and Mixtral's step-0 losses from identical bf16 weights (measured 4e-5)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", WANDB_MODE="offline")


@pytest.mark.timeout(300)
def test_dry_run_runs_every_part_and_tabulates_it(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "ava.bench.cli", "gpu", "--dry-run", "--device", "cpu",
                           "--threads", "1", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "gpu" and data["dry_run"] and data["dtype"] == "bf16"
    assert data["dtype_note"].startswith("dry run on the CPU in bf16")
    assert list(data["parts"]) == list(gpu_bench.PARTS) and data["packages"]["deepspeed"]
    for name, part in data["parts"].items():
        assert part["cap_s"] == gpu_bench.CAPS_S[name] and 0 < part["seconds"] < part["cap_s"]

    moe = data["parts"]["moe"]
    assert moe["status"] == "ok" and moe["dtype"] == "bf16" and moe["agree_tol"] == moe_bench.AGREE_TOL_BF16
    assert [p["label"] for p in moe["points"]] == [p.label for p in moe_bench.quick_sweep()]
    for point in moe["points"]:
        assert point["status"] == "ok" and set(point["results"]) == set(gpu_bench.MOE_IMPLS)
        for name in ("ava", "ava_grouped", "dense"):
            assert point["results"][name]["median_ms"] > 0
        assert point["results"]["ava_grouped"]["agrees"]  # in bf16 too
    for point in moe["points"][:2]:  # softmax top-k: transformers computes the same function
        assert point["results"]["hf"]["agrees"] and point["results"]["hf_eager"]["agrees"]

    base, mixtral = data["parts"]["train"]["runs"]
    assert data["parts"]["train"]["status"] == "ok" and base["label"] == "base" and base["dtype"] == "bfloat16"
    assert base["results"]["ava"]["status"] == "ok" and list(base["results"]) == ["ava"]
    assert mixtral["label"] == "base as Mixtral" and mixtral["results"]["hf"]["status"] == "ok"
    assert mixtral["loss_abs_diff_step0"] < BF16_LOSS_TOL  # same weights, same function

    compiled = data["parts"]["train_compiled"]
    assert compiled["status"] == "ok" and list(compiled["runs"][0]["results"]) == ["ava", "ava_compiled"]
    assert compiled["runs"][0]["loss_abs_diff_step0"] < BF16_LOSS_TOL  # compiling changed no function

    job = data["parts"]["main_job"]
    assert job["status"] == "ok" and job["steps"] == 3 and job["checkpoints"] == ["step_00000003"]
    assert job["engine"] == {"zero_stage": 2, "precision": "bf16", "optimizer": "DeepSpeedZeroOptimizer",
                             "optimizer_impl": "torch"}
    assert job["tokens_per_s"] > 0 and job["loss_first"] > 0

    rows = data["rows"]
    assert all(set(r) == ROW_KEYS for r in rows)
    assert [r["part"] for r in rows] == ["moe"] * 3 + ["train"] * 3 + ["train_compiled", "main_job"]
    assert rows[4]["vs_transformers"] > 0 and rows[4]["row"] == "base as Mixtral eager: Ava"
    tail = [line for line in proc.stdout.splitlines() if line.strip()]
    assert any(line.startswith("ava-bench gpu --dry-run") for line in tail[-30:])  # the table comes last
    assert any("main job cpu_demo, ZeRO-2 bf16" in line for line in tail[-30:])


@pytest.mark.timeout(120)
def test_a_failing_part_and_one_past_its_cap_are_rows_and_the_run_goes_on(tmp_path):
    # an unknown dtype fails each part inside its process; the next part still runs
    bad = gpu_bench.Settings(device="cpu", dtype="fp8", dry_run=True, seed=0, threads=1, workdir=str(tmp_path))
    payload = gpu_bench.run(bad, ["moe", "train"])
    moe, train = payload["parts"]["moe"], payload["parts"]["train"]
    assert moe["status"] == train["status"] == "failed: KeyError: 'fp8'" and "Traceback" in moe["traceback"]
    assert [(r["part"], r["row"], r["notes"]) for r in payload["rows"]] == [
        ("moe", "(part)", moe["status"]), ("train", "(part)", train["status"])]
    # a part still importing at its cap is stopped there
    good = gpu_bench.Settings(device="cpu", dtype="bf16", dry_run=True, seed=0, threads=1, workdir=str(tmp_path))
    train = gpu_bench.run(good, ["train"], caps={"train": 0.5})["parts"]["train"]
    assert train["status"] == "timed out: stopped at its 0.5 s cap" and train["seconds"] < 5


def test_a_capped_command_is_stopped_with_what_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    code = gpu_bench._run_capped([sys.executable, "-c", script], 3, dict(os.environ), tmp_path / "log", tee=False)
    assert code is None and (tmp_path / "log").read_text() == "started\n"
    status = Path(f"/proc/{pid_file.read_text()}/status")

    def alive() -> bool:
        try:
            return "zombie" not in status.read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 5  # SIGKILL reaches the group at once; the kernel ends it shortly after
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()  # killed with its process group


def test_the_readme_gives_the_command_the_bundle_script_prints():
    spec = importlib.util.spec_from_file_location("gpu_bundle_check", ROOT / "launch" / "gpu_bundle_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert f"\n{check.COMMAND}\n" in (ROOT / "README.md").read_text()
    assert "ava.bench.cli gpu" in check.COMMAND and "--target /tmp/site .whl/*.whl" in check.COMMAND
