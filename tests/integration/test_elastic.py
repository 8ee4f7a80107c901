"""Elastic resume on 2 CPU ranks (fp32) through DeepSpeed's universal checkpoint, keeping the
global batch (the accumulation adapts) and the sample order; the losses follow an uninterrupted
2-rank run to fp32 reduction-order tolerance. ZeRO-3: a checkpoint of 2 ranks continues on 1, and
one of 1 rank on 2. ZeRO-1 (DeepSpeed AutoEP) and ZeRO-2 (Ava's sharded layer, with the expert
bias): a checkpoint of 2 ranks without expert parallelism continues on 2 ranks at
expert_parallel_size=2, and that run's checkpoint on 1 rank without; every rank holds the experts
it should, as saved. Without trainer.elastic the change is refused. And the whole story on one
machine: two torchrun "nodes" with node-local caches, one killed, the run finished on the other,
continuing its (offline) W&B run."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import psutil  # a DeepSpeed dependency
import pytest
import torch

# dropless, no jitter, no balance losses: the loss is a mean of per-token terms, so regrouping the
# global batch into other micro-batches changes only the order of the sums
ELASTIC = ["trainer.micro_batch_size=4", "trainer.warmup_steps=2", "trainer.decay_steps=12",
           "trainer.save_every=4", "trainer.keep_last=3", "trainer.eval_every=0", "model.capacity_factor=null",
           "model.router_jitter=0.0", "model.aux_loss_coef=0", "model.z_loss_coef=0"]
REL = 1e-5  # fp32: the regrouped sums round differently; measured: at most 1e-7 (3e-7 with expert parallelism)
# the experts of ZeRO-1's model run on DeepSpeed AutoEP at ep=2 (SwiGLU without biases), ZeRO-2's on Ava's
# sharded layer (nano's GELU experts with biases), with the auxiliary-loss-free expert bias (a router buffer)
EP_MODELS = {1: ["model.activation=swiglu", "model.bias=false"], 2: ["model.expert_bias=true"]}
EP_IMPL = {1: "autoep", 2: "sharded"}


def copy_tag(src_run: Path, step: int, dst_run: Path) -> None:
    """A run directory holding only `src_run`'s checkpoint of `step` (and its tokenizer)."""
    tag = f"step_{step:08d}"
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / tag, dst_run / "checkpoints" / tag)
    shutil.copy(src_run / "tokenizer.json", dst_run / "tokenizer.json")


def master_weights(run_dir: Path, step: int) -> Dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint, gathered by DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{step:08d}")


def assert_universal_holds(run_dir: Path, step: int, saved: Dict[str, torch.Tensor]) -> None:
    """The universal checkpoint made for `run_dir`'s resume from `step` holds exactly the `saved`
    weights, every parameter of them, in Ava's own names and layout."""
    universal = run_dir / "checkpoints" / ".universal" / f"step_{step:08d}" / "zero"
    held = {p.name for p in universal.iterdir() if (p / "fp32.pt").is_file()}
    assert set(saved) <= held, sorted(set(saved) - held)
    for name, tensor in saved.items():
        fp32 = torch.load(universal / name / "fp32.pt", weights_only=False)  # DeepSpeed wrote it here
        fp32 = fp32["param"] if isinstance(fp32, dict) else fp32  # newer DeepSpeed wraps it with metadata
        assert torch.equal(fp32.view_as(tensor), tensor), name


def refused_without_elastic(trainer, run_dir: Path, overrides: List[str]) -> None:
    refused = trainer.run(run_dir, overrides, nproc=1)
    assert refused.returncode != 0  # torchrun reports the rank's exit 2 as 1
    assert "was saved by 2 rank(s) and this run has 1" in refused.output
    assert "set trainer.elastic=true to reshard it" in refused.output
    assert "DeepSpeed engine" not in refused.output  # refused before the engine is built


def assert_follows(reference: Dict[int, float], *runs, first: int, last: int) -> None:
    resumed = {step: loss for run in runs for step, loss in run.losses().items()}
    assert sorted(resumed) == list(range(first, last + 1))
    for step in range(first, last + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=REL), step


@pytest.mark.slow
def test_resume_on_another_world_size(trainer, tmp_path):
    elastic = ["deepspeed=zero3", *ELASTIC]
    reference = trainer.run(tmp_path / "ref", [*elastic, "trainer.max_steps=12"]).check().losses()

    one = tmp_path / "one_rank"
    copy_tag(tmp_path / "ref", 4, one)
    down = trainer.run(one, [*elastic, "trainer.max_steps=8", "trainer.elastic=true"], nproc=1).check()
    assert ("elastic resume from step_00000004: world size 2 -> 1, expert_parallel_size 1 -> 1, gradient "
            "accumulation 1 -> 2, micro-batch 4: the global batch of 8 stays") in down.output
    assert "RNG streams re-seeded per rank from (seed 1234, step 4, rank)" in down.output
    saved = master_weights(tmp_path / "ref", 4)
    assert_universal_holds(one, 4, saved)
    assert {p.name for p in (one / "checkpoints" / ".universal" / "step_00000004" / "zero").iterdir()
            if p.is_dir()} == set(saved)

    two = tmp_path / "two_ranks"
    copy_tag(one, 8, two)
    up = trainer.run(two, [*elastic, "trainer.max_steps=12", "trainer.elastic=true"]).check()
    assert "world size 1 -> 2, expert_parallel_size 1 -> 1, gradient accumulation 2 -> 1" in up.output
    assert_follows(reference, down, up, first=5, last=12)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_resume_under_another_expert_parallel_split(trainer, tmp_path, stage):
    from ava.export.consolidate import consolidate

    impl, elastic = EP_IMPL[stage], [f"deepspeed=zero{stage}", *ELASTIC, *EP_MODELS[stage]]
    reference = trainer.run(tmp_path / "ref", [*elastic, "trainer.max_steps=12"]).check()

    split = tmp_path / "ep2"  # 2 ranks, ep 1 -> 2
    copy_tag(tmp_path / "ref", 4, split)
    ep2 = trainer.run(split, [*elastic, "trainer.max_steps=8", "trainer.elastic=true",
                              "trainer.expert_parallel_size=2"]).check()
    assert ("elastic resume from step_00000004: world size 2 -> 2, expert_parallel_size 1 -> 2, gradient "
            "accumulation 1 -> 1, micro-batch 4: the global batch of 8 stays") in ep2.output
    assert f"expert parallel ({impl}): ep=2, rank 0 holds experts [0, 2) of 4" in ep2.output
    assert ("elastic resume: rank 0 experts [0, 2), rank 1 experts [2, 4) of 4 in each of 2 MoE layers; their fp32 "
            "weights and Adam moments equal the checkpoint's") in ep2.output
    assert "re-seeded" not in ep2.output  # the same ranks: every rank's own RNG streams and loader position
    assert_universal_holds(split, 4, master_weights(tmp_path / "ref", 4))

    one = tmp_path / "one_rank"  # 2 ranks at ep=2 -> 1 rank
    copy_tag(split, 8, one)
    if stage == 2:  # the refusal is the same for every stage
        refused_without_elastic(trainer, one, [*elastic, "trainer.max_steps=12"])
    down = trainer.run(one, [*elastic, "trainer.max_steps=12", "trainer.elastic=true"], nproc=1).check()
    assert "world size 2 -> 1, expert_parallel_size 2 -> 1, gradient accumulation 1 -> 2, micro-batch 4" in down.output
    assert ("elastic resume: rank 0 experts [0, 4) of 4 in each of 2 MoE layers; their fp32 weights and Adam "
            "moments equal the checkpoint's") in down.output
    # the ep=2 checkpoint's weights as saved (the model states and every per-expert file), in Ava's layout
    assert_universal_holds(one, 8, consolidate(split / "checkpoints", "step_00000008"))
    assert_follows(reference.losses(), ep2, down, first=5, last=12)
    if stage == 2:  # the expert bias (a router buffer the universal load does not restore) came along
        biases = [consolidate(run / "checkpoints", "step_00000012") for run in (reference.run_dir, one)]
        for layer in (0, 1):
            name = f"layers.{layer}.moe.router.balance_bias"
            assert float(biases[0][name].abs().max()) > 0
            assert torch.allclose(biases[1][name], biases[0][name], rtol=0, atol=1e-6), name


DIST_TIMEOUT_S = 30
WAIT_S = 300  # the fixtures' limit on one run


def start_node(trainer, node: int, port: int, run_dir: Path, overrides: List[str],
               cache: Path) -> subprocess.Popen:
    """One of two torchrun "nodes" (one rank each, LOCAL_RANK 0 on both) meeting through c10d
    rendezvous on 127.0.0.1; node 0 hosts the store. Ranks follow the sorted node addresses, so
    node 0 (127.0.0.1) is global rank 0 and node 1 (127.0.0.2, also loopback) rank 1. Its own
    AVA_CACHE stands for a node-local disk."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
           "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", f"127.0.0.{node + 1}",
           "--max-restarts", "0", "-m", "ava.train", *trainer.base_overrides(), f"hydra.run.dir='{run_dir}'",
           *overrides]
    env = {**trainer.env(2), "AVA_CACHE": str(cache)}
    log = (run_dir.parent / f"node{node}.log").open("w")
    return subprocess.Popen(cmd, cwd=run_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def lose_node(agent: subprocess.Popen) -> None:
    """SIGKILL a node's agent and its workers at once, as when the machine goes away. torchrun starts
    each worker in a session of its own, so the agent's process group alone would miss them."""
    for proc in [*psutil.Process(agent.pid).children(recursive=True), psutil.Process(agent.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    agent.wait()


@pytest.mark.slow
def test_two_nodes_lose_one_and_the_run_finishes_on_the_other(trainer, tmp_path):
    nodes = type(trainer)(trainer.corpus, None, trainer.conf_dir)  # data.cache_dir from AVA_CACHE, per node
    run_dir = tmp_path / "run"  # shared by both nodes, as a cluster's shared filesystem
    run_dir.mkdir()
    caches = [tmp_path / "node0_cache", tmp_path / "node1_cache"]
    common = ["deepspeed=zero2", *ELASTIC, f"trainer.dist_timeout_s={DIST_TIMEOUT_S}", "logger=wandb",
              "logger.project=ava-test", "logger.heatmap_every=0", "logger.report=false"]  # offline W&B
    port = trainer.free_port()
    procs = [start_node(nodes, node, port, run_dir, [*common, "trainer.max_steps=1000"], caches[node])
             for node in (0, 1)]
    try:
        trainer.wait_for_steps(procs[0], run_dir, 6)
        lose_node(procs[1])
        killed = time.monotonic()
        procs[0].wait(timeout=WAIT_S)
        survivor_s = time.monotonic() - killed
    finally:
        for proc in procs:
            if proc.poll() is None:
                lose_node(proc)
    node0 = (tmp_path / "node0.log").read_text()
    assert procs[0].returncode != 0, node0[-4000:]
    assert survivor_s < DIST_TIMEOUT_S, (survivor_s, node0[-4000:])
    assert "error: lost contact with another rank" in node0, node0[-4000:]
    # each node's first rank prepared the same token cache on its own disk
    built = [sorted(p.name for p in (cache / "data").iterdir() if not p.name.startswith(".")) for cache in caches]
    assert built[0] == built[1] and len(built[0]) == 1, built
    first = [(cache / "data" / built[0][0] / "tokenizer.json").read_bytes() for cache in caches]
    assert first[0] == first[1]

    tag = (run_dir / "checkpoints" / "latest").read_text()
    saved = int(tag.removeprefix("step_"))
    assert saved >= 4
    steps_before = {json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    end = saved + 4
    resumed = nodes.run(run_dir, [*common, f"trainer.max_steps={end}", "trainer.elastic=true"], nproc=1,
                        extra_env={"AVA_CACHE": str(caches[0])}).check()
    assert (f"elastic resume from {tag}: world size 2 -> 1, expert_parallel_size 1 -> 1, gradient accumulation "
            "1 -> 2, micro-batch 4: the global batch of 8 stays") in resumed.output
    assert f"data: reusing cache {caches[0] / 'data' / built[0][0]}" in resumed.output
    run_id = json.loads((run_dir / "wandb_state.json").read_text())["id"]
    assert f"W&B: continuing run {run_id} after step" in resumed.output  # the same W&B run goes on
    losses = resumed.losses()
    assert sorted(s for s in losses if s > saved) == list(range(saved + 1, end + 1))
    assert steps_before >= set(range(1, saved + 1))
