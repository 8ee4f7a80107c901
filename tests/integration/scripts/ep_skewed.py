"""Run under torchrun (2 CPU ranks): an expert-parallel engine (ep = argv[1]) whose router sends
every token to experts 0 and 1, so the experts of the other rank receive no tokens at all.
argv[3] picks the model: `autoep` (SwiGLU, dropless: DeepSpeed AutoEP) or `sharded` (nano's GELU
experts with biases and capacity: Ava's sharded layer, which also drops slots here).

Each rank writes `argv[2]/rank<r>.json`: its expert tensor shapes, the routed counts, the losses.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from ava.config import DeepSpeedConfig, TrainerConfig, model_preset
from ava.model.transformer import AvaForCausalLM
from ava.train.distributed import init_distributed, shutdown_and_exit
from ava.train.engine import build_engine
from ava.train.plan import make_plan

STEPS = 3


def main() -> None:
    ep, world = int(sys.argv[1]), int(os.environ["WORLD_SIZE"])
    models = {"autoep": dict(activation="swiglu", bias=False, router_jitter=0.0, capacity_factor=None),
              "sharded": dict(router_jitter=0.0)}
    cfg = model_preset("nano", top_k=2, **models[sys.argv[3]])
    trainer = TrainerConfig(expert_parallel_size=ep, micro_batch_size=2, optimizer_impl="torch",
                            precision="fp32", lr=1e-3, warmup_steps=0, max_steps=STEPS)
    plan = make_plan(trainer, DeepSpeedConfig(config="zero2"), cfg, world)
    init_distributed()  # Ava's, as the trainer does (DeepSpeed's own would JIT-build a kernel first)
    torch.manual_seed(0)
    model = AvaForCausalLM(cfg)
    with torch.no_grad():  # a large constant feature, read only by experts 0 and 1's router rows
        model.embed_tokens.weight[:, 0] = 10.0
        for layer in model.layers:
            layer.moe.router.gate.weight.zero_()
            layer.moe.router.gate.weight[:2, 0] = 1.0
    engine = build_engine(model, trainer, plan)
    rank = engine.global_rank
    gen = torch.Generator().manual_seed(rank)
    losses, counts = [], None
    for _ in range(STEPS):
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
        out = engine(ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
        counts = [s.tokens_per_expert.tolist() for s in out.router_stats]
    shapes = {n: list(p.shape) for n, p in engine.module.named_parameters() if "experts" in n}
    result = {"rank": rank, "shapes": shapes, "counts": counts, "losses": losses}
    (Path(sys.argv[2]) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    shutdown_and_exit(0)  # every rank meets and exits without gloo's finalization abort
