"""`trainer.compile`: compiled blocks (inductor, the real backend on CPU) train the same model as
eager ones, with activation checkpointing, and never recompile once the first step compiled;
what `trainer.compile` resolves to, and what it refuses before anything starts."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch._dynamo

from ava.config import IGNORE_INDEX, ConfigError, DeepSpeedConfig, TrainerConfig, model_preset
from ava.model.transformer import AvaForCausalLM
from ava.observe.callbacks import StepOutput, TrainState
from ava.train.compile import CompileWatch, compile_blocks, graphs_compiled
from ava.train.plan import make_plan

STEPS = 5  # training steps after the first (compiling) one; every batch routes differently

# What this test holds is dynamo's and AOT autograd's: the guards that would recompile on a new
# routing, the graph split at the eager experts, the backward through it under activation
# checkpointing. `aot_eager` runs exactly those and skips inductor's code generation: 10 s
# instead of 19 s with a warm inductor cache, 116 s cold (2-core box, contended). Inductor
# itself, the trainer's backend, runs in the 2-rank ZeRO-3 test (tests/integration/
# test_zero_stages.py), whose losses must equal the eager single process's.
BACKEND = "aot_eager"

# fp32: compiled graphs may run sums in another order than eager (~1e-7 relative per reduction).
# Measured at the same weights over 6 routings of nano: aot_eager bit-equal; inductor loss equal,
# gradients <= 8e-6 relative to their norm (attention's q/k in the second layer); we allow ~6x,
# so the tolerance holds for either backend.
# A wrong graph (a block's output, a gradient path cut at the eager experts, stale routing) is
# off by 1e-2 or more.
LOSS_RTOL = 1e-5
GRAD_RTOL = 5e-5


def _batch(gen: torch.Generator, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (4, 32), generator=gen)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    return ids, labels


def test_compiled_blocks_train_like_eager_and_never_recompile():
    """The loop backend hands per-expert counts to Python: the routing-dependent shapes that made
    a compiled model recompile at every routing decision. (The grouped path, static shapes, runs
    compiled in tests/integration/test_zero_stages.py.) Capacity (drops) and activation
    checkpointing on; no jitter (inductor draws other random numbers than eager). Each step the
    eager model learns and the compiled one takes its weights: both are compared at the same
    weights, at a new routing every step."""
    torch._dynamo.reset()
    cfg = model_preset("nano", expert_backend="loop", router_jitter=0.0, capacity_factor=1.0,
                       activation_checkpointing=True)
    torch.manual_seed(0)
    eager = AvaForCausalLM(cfg).train()
    compiled = copy.deepcopy(eager)
    names = list(compiled.state_dict())
    assert compile_blocks(compiled, backend=BACKEND) == cfg.num_layers
    assert compile_blocks(compiled) == 0  # already compiled: left as it is
    assert list(compiled.state_dict()) == names  # checkpoints keep their tensor names
    opt = torch.optim.AdamW(eager.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    first_graphs = None
    routings = set()
    for step in range(STEPS + 1):
        ids, labels = _batch(gen, cfg.vocab_size)
        before = graphs_compiled()
        # from the first step: every block after the first must reuse its graphs, not recompile
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs = [m(ids, labels=labels) for m in (eager, compiled)]
            for out in outs:
                out.loss.backward()
        if step == 0:
            first_graphs = graphs_compiled() - before
        else:
            assert graphs_compiled() == before, f"step {step} compiled new graphs"
        routings.add(tuple(outs[0].router_stats[0].tokens_per_expert.tolist()))
        torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=LOSS_RTOL, atol=0)
        torch.testing.assert_close(outs[1].router_stats[0].tokens_per_expert, outs[0].router_stats[0].tokens_per_expert)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            error = ((q.grad - p.grad).norm() / p.grad.norm()).item()
            assert error <= GRAD_RTOL, f"step {step}: gradient of {name} off by {error:.1e} (relative)"
        opt.step()  # the eager model learns; the compiled one takes its weights (in place: no recompile)
        with torch.no_grad():
            for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
                q.copy_(p)
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
    assert first_graphs and first_graphs > 0  # the blocks really ran compiled
    assert len(routings) == STEPS + 1  # the routing changed every step, the graphs did not


def test_compile_watch_logs_the_first_step_once_and_warns_on_a_recompilation(caplog):
    """A later step that compiles anything (here a new input dtype for a compiled function) is
    a recompilation the run must hear about."""
    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend="eager")  # the watch, not a backend, is tested
    watch, state = CompileWatch(blocks=2), TrainState()
    watch.on_train_start(state)
    with caplog.at_level(logging.INFO, logger="ava.train"):
        for step, dtype in enumerate([torch.float32, torch.float32, torch.float64], start=1):
            watch.pre_step(state)
            double(torch.ones(3, dtype=dtype))
            state.step = step
            watch.post_step(state, StepOutput(loss=0.0))
    first = [r.message for r in caplog.records if "first training step" in r.message]
    assert len(first) == 1 and first[0].endswith("compiling 1 graphs for 2 blocks")  # none before it
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("torch.compile: step 3 compiled 1 new graphs")
    assert watch.recompiled_steps == [3]
    assert "1 later steps recompiled" in watch.summary()


def _plan(compile, ep=1):
    trainer = TrainerConfig(compile=compile, expert_parallel_size=ep, micro_batch_size=1,
                            optimizer_impl="torch", precision="fp32")
    model = model_preset("nano", activation="swiglu", bias=False, router_jitter=0.0, capacity_factor=None)
    return make_plan(trainer, DeepSpeedConfig(config="zero2"), model, world_size=2)


def test_compile_resolves_per_device_and_refuses_expert_parallelism():
    """null: off on this CPU-only machine (it does not pay here) and under expert parallelism."""
    assert _plan(None).compile is False
    assert _plan(True).compile is True and _plan(False).compile is False
    assert _plan(None, ep=2).compile is False
    with pytest.raises(ConfigError, match=r"^trainer.compile=true cannot be combined with "
                                          r"trainer.expert_parallel_size=2: the expert-parallel layers"):
        _plan(True, ep=2)
