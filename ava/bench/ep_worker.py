"""One rank of `ava-bench ep` (launched by torchrun): training steps of a preset at a given
expert-parallel size through Ava's own engine builder; rank 0 writes the timings as JSON."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ava.train.distributed import init_distributed, shutdown_and_exit


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ep", type=int, required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--overrides", default="{}", help="JSON dict of model overrides")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from ava.bench.train_bench import make_batch
    from ava.config import DeepSpeedConfig, TrainerConfig, model_preset
    from ava.model.transformer import AvaForCausalLM
    from ava.train.engine import build_engine
    from ava.train.expert_parallel import implementation
    from ava.train.plan import make_plan

    world = int(os.environ["WORLD_SIZE"])
    # by default what AutoEP computes (dropless, jitter-free top-k, SwiGLU); other models (e.g.
    # activation=gelu) run on Ava's sharded layer: the same function at every ep either way
    cfg = model_preset(args.preset, **{"activation": "swiglu", "bias": False, "router_jitter": 0.0,
                                       "capacity_factor": None, **json.loads(args.overrides)})
    trainer = TrainerConfig(expert_parallel_size=args.ep, micro_batch_size=args.batch, precision="fp32",
                            optimizer_impl="torch", warmup_steps=0, max_steps=args.warmup + args.steps)
    plan = make_plan(trainer, DeepSpeedConfig(config="zero2"), cfg, world)
    init_distributed()
    torch.manual_seed(0)
    engine = build_engine(AvaForCausalLM(cfg), trainer, plan)
    rank = engine.global_rank
    samples, losses = [], []
    for step in range(args.warmup + args.steps):
        batch = make_batch(cfg.vocab_size, args.batch, args.seq_len, engine.device, seed=step * world + rank)
        torch.distributed.barrier()
        start = time.perf_counter()
        out = engine(batch["ids"], labels=batch["ava_labels"])
        engine.backward(out.loss)
        engine.step()
        torch.distributed.barrier()
        if step >= args.warmup:
            samples.append(time.perf_counter() - start)
        losses.append(float(out.loss.detach()))
    if rank == 0:
        step_s = statistics.median(samples)
        tokens = args.batch * args.seq_len * world
        Path(args.out).write_text(json.dumps({
            "ep": args.ep, "implementation": implementation(cfg) if args.ep > 1 else "data parallel",
            "world_size": world, "step_ms": step_s * 1e3,
            "step_min_ms": min(samples) * 1e3, "step_max_ms": max(samples) * 1e3, "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s, "losses": losses,
            "expert_params_per_rank": sum(p.numel() for n, p in engine.module.named_parameters()
                                          if ".experts." in n),
        }))


if __name__ == "__main__":
    main()
    shutdown_and_exit(0)  # every rank meets and exits without gloo's finalization abort
