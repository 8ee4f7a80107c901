"""Expert parallelism on 2 CPU ranks, both implementations (DeepSpeed AutoEP for a SwiGLU model
it runs exactly; Ava's sharded layer on DeepSpeed's expert groups for a GELU model with biases,
jitter, capacity and `residual` overflow): ep=2 against ep=1 with the same global batch, exact
resume, an elastic resume under another split on the same ranks (the sharded layer; both layers
also change split with the world size in test_elastic.py) or its refusal without
trainer.elastic, export, and a rank whose experts get no tokens.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ava.export import export_checkpoint
from ava.inference.format import detect, read_tensors

from .conftest import REPO, TIMEOUT_S, free_port

MODELS = {
    # AutoEP routes dropless top-k without jitter into SwiGLU experts: the model is that function
    "autoep": ["model.activation=swiglu", "model.bias=false", "model.router_jitter=0", "model.capacity_factor=null"],
    # nano's GELU experts with biases and jitter; capacity 1.5 drops slots, which `residual` serves;
    # and the newer families' options: GQA with q/k head norms and q/k/v biases, sigmoid scores
    # scaled, auxiliary-loss-free expert bias, a gated shared expert (data-parallel), a dense third
    # layer (no experts to shard)
    "sharded": ["model.capacity_factor=1.5", "model.overflow=residual", "model.num_kv_heads=2",
                "model.qk_norm=head", "model.attn_bias=true", "model.router_score=sigmoid",
                "model.routed_scaling_factor=2.0", "model.expert_bias=true", "model.bias_update_rate=0.01",
                "model.shared_experts=1", "model.shared_expert_gate=true", "model.num_layers=3",
                "model.dense_layers=[2]"],
}
COMMON = ["deepspeed=zero2", "trainer.micro_batch_size=4", "trainer.max_steps=6", "trainer.save_every=3",
          "trainer.eval_every=3", "trainer.warmup_steps=1"]
RUN = [*MODELS["autoep"], *COMMON]
IMPLS = pytest.mark.parametrize("impl", sorted(MODELS))
# rank 0's expert tensors as each implementation holds them (nano: 4 experts, hidden 64, ffn 128)
LOCAL_EXPERTS = {
    "autoep": "layers.0.moe.experts.w1 [2, 128, 64], layers.0.moe.experts.w2 [2, 64, 128], "
              "layers.0.moe.experts.w3 [2, 128, 64]",
    "sharded": "layers.0.moe.deepspeed_moe.experts.deepspeed_experts.0.w1 [64, 128], "
               "layers.0.moe.deepspeed_moe.experts.deepspeed_experts.0.w2 [128, 64], "
               "layers.0.moe.deepspeed_moe.experts.deepspeed_experts.0.b1 [128]",
}

# ep=2 computes the same sums in another order (tokens exchanged by all-to-all, experts run on
# their own rank); both runs use the same per-rank batches, so even the load-balancing loss (a
# product of per-batch means) is the same function. Measured: the losses agree to ~1e-8
# (AutoEP) and ~1e-7 (sharded: its experts run under plain autograd, ep=1's under the grouped
# kernel) relative over 6 steps; a real bug (a lost expert gradient, a wrong expert split) moves them by
# 1e-3 or more.
LOSS_RTOL = 1e-6
# Exported weights after 6 AdamW steps at lr 3e-3: AdamW divides by sqrt(v), so a ~1e-8 gradient
# difference in a coordinate whose gradient is ~0 moves it by up to lr per step. Measured: <= 5e-5
# of each tensor's largest value; a layout bug (a transpose, gate and up swapped, experts out of
# order) is of the order of the weights themselves.
EXPORT_RTOL = 1e-3


@pytest.fixture(scope="module")
def runs(trainer, tmp_path_factory):
    """(implementation, ep) -> run."""
    root = tmp_path_factory.mktemp("expert_parallel")
    return {(impl, ep): trainer.run(root / f"{impl}{ep}", [*MODELS[impl], *COMMON,
                                                           f"trainer.expert_parallel_size={ep}"]).check()
            for impl in sorted(MODELS) for ep in (1, 2)}


@pytest.fixture(scope="module")
def ep1_exports(runs, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("ep1_exports")
    return {impl: _export(runs[impl, 1].run_dir, root / impl) for impl in sorted(MODELS)}


@pytest.mark.slow
@IMPLS
def test_ep2_matches_ep1_and_each_rank_holds_only_its_experts(runs, impl):
    ep1, ep2 = runs[impl, 1].losses(), runs[impl, 2].losses()
    assert sorted(ep1) == sorted(ep2) == [1, 2, 3, 4, 5, 6]
    for step in ep1:
        assert math.isclose(ep2[step], ep1[step], rel_tol=LOSS_RTOL), f"step {step}: {ep2[step]!r} vs {ep1[step]!r}"
    assert ep2[6] < ep2[1]
    # rank 0 holds experts 0 and 1 of each layer
    assert (f"expert parallel ({impl}): ep=2, rank 0 holds experts [0, 2) of 4 in each of 2 layers: "
            f"{LOCAL_EXPERTS[impl]}") in runs[impl, 2].output
    assert "expert parallel" not in runs[impl, 1].output
    saved = sorted(p.name for p in (runs[impl, 2].run_dir / "checkpoints" / "step_00000006").glob("layer_*"))
    assert saved == [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(4)]


def _biases(run_dir: Path) -> dict[str, torch.Tensor]:
    return {n: t for n, t in _module_state(run_dir, 6).items() if n.endswith("balance_bias")}


@pytest.mark.slow
@IMPLS
def test_ep2_resumes_exactly_and_elastically_or_refuses_another_split(runs, trainer, tmp_path, impl):
    tag = runs[impl, 2].run_dir / "checkpoints" / "step_00000003"
    ep2 = [*MODELS[impl], *COMMON, "trainer.expert_parallel_size=2"]
    resumed = trainer.run(tmp_path / "resumed", [*ep2, f"trainer.resume='{tag}'"])
    resumed.check()
    assert "resuming from step_00000003 at step 3" in resumed.output
    assert resumed.losses() == {s: loss for s, loss in runs[impl, 2].losses().items() if s > 3}
    if impl == "sharded":  # the expert bias (a buffer moved after every step) resumed bit for bit
        biases = [_biases(r.run_dir) for r in (resumed, runs[impl, 2])]
        assert sorted(biases[0]) == ["layers.0.moe.router.balance_bias", "layers.1.moe.router.balance_bias"]
        assert all(torch.equal(biases[0][n], biases[1][n]) for n in biases[1])
        assert any(float(t.abs().max()) > 0 for t in biases[1].values())

        # the same ranks at ep=1 (trainer.elastic): each rank's loader position and RNG streams are its own, so
        # even capacity drops and router jitter continue as in the uninterrupted runs
        ep1 = trainer.run(tmp_path / "ep1", [*MODELS[impl], *COMMON, "trainer.expert_parallel_size=1",
                                              "trainer.elastic=true", f"trainer.resume='{tag}'"]).check()
        assert ("elastic resume from step_00000003: world size 2 -> 2, expert_parallel_size 2 -> 1, gradient "
                "accumulation 1 -> 1") in ep1.output
        assert ("elastic resume: rank 0 experts [0, 4), rank 1 experts [0, 4) of 4 in each of 2 MoE layers; their "
                "fp32 weights and Adam moments equal the checkpoint's") in ep1.output
        for step, loss in ep1.losses().items():
            assert math.isclose(loss, runs[impl, 2].losses()[step], rel_tol=LOSS_RTOL), step
        assert sorted(ep1.losses()) == [4, 5, 6]
        for name, bias in _biases(runs[impl, 2].run_dir).items():
            assert torch.allclose(_biases(ep1.run_dir)[name], bias, rtol=0, atol=1e-6), name
        return  # the refusal is the trainer's, the same for both: run once

    # the deepspeed launcher: torchrun prints a traceback of its own when a rank exits non-zero
    other = trainer.run(tmp_path / "other", [*RUN, "trainer.expert_parallel_size=1", f"trainer.resume='{tag}'"],
                        launcher="deepspeed")
    assert other.returncode != 0
    assert (f"checkpoint {tag} was saved with trainer.expert_parallel_size=2 and this run has 1: each rank's "
            "experts and optimizer shards follow that split. Relaunch with trainer.expert_parallel_size=2, set "
            "trainer.elastic=true to reshard it") in other.output
    assert "DeepSpeed engine" not in other.output  # refused before the engine is built
    assert "Traceback" not in other.output


def _module_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    # our own test artifact, written by DeepSpeed with pickled extras: not untrusted input
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def _export(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """In process (the CLI is tested in test_export.py): what `ava-export RUN OUT --layout ava` writes."""
    return read_tensors(detect(export_checkpoint(run_dir, out, layout="ava", progress=lambda _m: None)))


EXPERT_SHAPES = {  # Ava's layout, every expert of layer 0
    "autoep": {"w_gate_up": (4, 64, 256), "w_down": (4, 128, 64)},
    "sharded": {"w1": (4, 64, 128), "b1": (4, 128), "w2": (4, 128, 64), "b2": (4, 64)},
}


@pytest.mark.slow
@IMPLS
def test_export_consolidates_expert_shards_into_the_ep1_model(runs, ep1_exports, tmp_path, impl):
    ep1, ep2 = ep1_exports[impl], _export(runs[impl, 2].run_dir, tmp_path / "ep2")
    assert sorted(ep2) == sorted(ep1)
    for name, shape in EXPERT_SHAPES[impl].items():
        assert ep2[f"layers.0.moe.experts.{name}"].shape == shape
    for name, expected in ep1.items():
        assert ep2[name].shape == expected.shape and ep2[name].dtype == expected.dtype, name
        scale = float(expected.abs().max())
        assert float((ep2[name] - expected).abs().max()) <= EXPORT_RTOL * scale, name


@pytest.mark.slow
def test_ep2_under_zero3_matches_and_exports_the_ep1_model(runs, ep1_exports, trainer, tmp_path):
    """ZeRO-3 partitions the experts' parameters over the expert-data-parallel group; its
    checkpoint has no per-expert files and is consolidated by DeepSpeed's ds_to_universal."""
    run = trainer.run(tmp_path / "zero3", [*RUN, "deepspeed=zero3", "trainer.expert_parallel_size=2"]).check()
    assert "ZeRO stage 3" in run.output
    ep1 = runs["autoep", 1].losses()
    for step, loss in run.losses().items():
        assert math.isclose(loss, ep1[step], rel_tol=LOSS_RTOL), f"step {step}: {loss!r} vs {ep1[step]!r}"
    assert not list((run.run_dir / "checkpoints" / "step_00000006").glob("layer_*"))
    reference, exported = ep1_exports["autoep"], _export(run.run_dir, tmp_path / "zero3x")
    assert sorted(exported) == sorted(reference)
    for name, expected in reference.items():
        assert exported[name].shape == expected.shape, name
        assert float((exported[name] - expected).abs().max()) <= EXPORT_RTOL * float(expected.abs().max()), name


@pytest.mark.slow
@IMPLS
def test_a_rank_whose_experts_get_no_tokens_does_not_hang(tmp_path, impl):
    """Every token routes to experts 0 and 1 (rank 0's): rank 1 runs its experts on no tokens."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(REPO / "tests" / "integration" / "scripts" / "ep_skewed.py"), "2", str(tmp_path), impl],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["rank"] == rank
        assert result["counts"] == [[32.0, 32.0, 0.0, 0.0]] * 2  # experts 2 and 3 (rank 1's) got nothing
        shapes = result["shapes"]
        if impl == "autoep":
            assert shapes["layers.0.moe.experts.w1"] == [2, 128, 64]
        else:  # two whole experts per rank, each [H, I] + bias
            w1 = [s for n, s in shapes.items() if n.startswith("layers.0.") and n.endswith(".w1")]
            assert w1 == [[64, 128], [64, 128]]
        assert len(result["losses"]) == 3 and all(math.isfinite(v) for v in result["losses"])


@pytest.mark.slow
def test_ava_bench_ep_quick_runs_both_sizes_and_writes_json(tmp_path):
    out = tmp_path / "ep.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-m", "ava.bench.cli", "ep", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "ep" and data["ranks"] == 2 and data["environment"]["device"] == "cpu"
    ep1, ep2 = data["results"]["ep1"], data["results"]["ep2"]
    assert ep1["status"] == ep2["status"] == "ok"
    assert (ep1["implementation"], ep2["implementation"]) == ("data parallel", "autoep")
    assert ep1["tokens_per_step"] == ep2["tokens_per_step"] == 2 * 2 * 32
    assert ep2["expert_params_per_rank"] * 2 == ep1["expert_params_per_rank"]  # half the experts each
    assert math.isclose(ep2["losses"][0], ep1["losses"][0], rel_tol=LOSS_RTOL)  # the same function
    assert done.stdout.rstrip().splitlines()[-1].startswith("└")  # the table is printed last
