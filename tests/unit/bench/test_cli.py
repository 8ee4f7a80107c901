"""`ava-bench moe --quick` and `ava-bench train --quick` write the JSON the README documents and
print their table last. Run in a subprocess: DeepSpeed's one-rank process group stays out of the
test process. No timed assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-m", "ava.bench.cli", *args, "--threads", "1", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _check_environment(env: dict) -> None:
    assert env["device"] == "cpu" and env["torch_threads"] == 1
    for pkg in ("torch", "deepspeed", "transformers"):
        assert pkg in env["versions"]


@pytest.mark.timeout(600)
def test_moe_quick_writes_json_and_prints_table_last(tmp_path):
    data, stdout = _bench(tmp_path, "moe", "--quick", "--warmup", "0", "--repeats", "1")
    _check_environment(data["environment"])
    assert data["benchmark"] == "moe" and data["memory_method"]
    assert set(data["targets"]) >= {"ava_at_least_as_fast_as_fastest_peer_everywhere",
                                    "ava_within_1.25x_dense_for_E8_k2", "peak_activation_memory_within_1.5x_dense"}
    assert len(data["points"]) == 3
    for row in data["points"][:2]:
        assert set(row["point"]) == {"tokens", "experts", "top_k", "hidden", "ffn", "routing", "router", "shared"}
        results = row["results"]
        assert set(results) == {"ava", "ava_loop", "ava_grouped", "dense", "roofline", "naive", "hf", "hf_eager",
                                    "deepspeed"}
        for name, entry in results.items():
            assert entry["status"] == "ok" or entry["status"]  # a reason when it could not run
            if entry["status"] == "ok":
                assert entry["median_ms"] > 0 and entry["tokens_per_s"] > 0
                if name != "roofline":
                    assert entry["peak_fwd_bytes"] > 0
        for name in ("naive", "hf", "hf_eager"):
            assert results[name]["agrees"], (name, results[name])
        if row["point"]["top_k"] >= 2 and results["deepspeed"]["status"] == "ok":
            assert results["deepspeed"]["agrees"]
        assert {"best_peer", "speedup_vs_best_peer", "ava_over_dense_time", "ava_over_dense_memory"} <= set(
            row["summary"])
    # DeepSeek's router and a shared expert: Ava's rows against the dense bound of k + 1 experts
    variant = data["points"][2]
    assert variant["label"].endswith("bala sigm+bias +1sh") and variant["flops"] == 3 * 2 * 3 * 256 * 3 * 64 * 128
    for name in ("naive", "hf", "hf_eager", "deepspeed"):
        assert variant["results"][name]["status"] == "n/a: computes softmax top-k without shared experts"
    for name in ("ava_loop", "ava_grouped"):
        assert variant["results"][name]["agrees"], variant["results"][name]
    assert "ava_over_dense_time" in variant["summary"] and "best_peer" not in variant["summary"]
    tail = [line for line in stdout.splitlines() if line.strip()]
    assert any("ava-bench moe" in line for line in tail[-16:])  # the table is the last thing printed


@pytest.mark.timeout(600)
def test_train_quick_losses_agree_at_step_zero(tmp_path):
    """With `--compile` (+4-7 s here with a warm inductor cache): the compiled rows beside the
    eager ones, the same step-0 loss, and their compile time."""
    data, stdout = _bench(tmp_path, "train", "--quick", "--compile")
    _check_environment(data["environment"])
    assert data["loss_abs_diff_step0"] < 1e-5  # every model, compiled ones included, vs Ava eager
    assert list(data["results"]) == ["ava", "ava_compiled", "hf", "hf_compiled", "hf_eager"]
    for name, r in data["results"].items():
        assert r["status"] == "ok"
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["flops_per_s"] > 0
        assert {"forward_ms", "backward_ms", "optimizer_ms"} <= set(r)
        assert r["peak_step_bytes"] > 0 and r["matmul_fraction"] > 0
        assert ("compile_s" in r) == name.endswith("_compiled")
        if "compile_s" in r:
            assert r["speedup_vs_eager"] > 0
    assert data["threads"] == 1 and data["other_threads"] == {}  # --threads 1: one column, not two
    assert data["matmul_flops_per_s"] > 0
    assert set(data["memory_ratio"]) == {"ava_compiled", "hf", "hf_compiled", "hf_eager"}
    assert "compile s" in stdout
    assert any("step 2/3" in line for line in stdout.splitlines())  # progress while it runs
    assert data["results"]["ava"]["parameters"] == data["results"]["hf"]["parameters"]
    assert "ava-bench train" in stdout
