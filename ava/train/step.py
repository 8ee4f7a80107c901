"""One optimizer step: the micro-batches' forward/backward, one all-reduce of the losses and
the stop vote, the hooks around `engine.step()`.

Gradient health decides in `pre_optim_step` (before parameters change) whether the step is
applied; DeepSpeed's `was_step_applied()` says what happened; `post_step` callbacks add their
metrics and set the loop's action.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, List, Tuple

import torch

from ava import dist
from ava.observe.callbacks import StepOutput

if TYPE_CHECKING:
    from ava.train.run import Run

LOSS_KEYS = ("train/loss", "train/lm_loss", "train/aux_loss", "train/z_loss", "moe/dropped_fraction")


def reduce_losses(sums: torch.Tensor, accum: int, stop_requested: bool) -> Tuple[List[float], bool]:
    """Mean over micro-batches and ranks of the per-step sums, and whether any rank was asked to
    stop, in one all-reduce."""
    vote = torch.tensor([float(stop_requested)], dtype=torch.float64, device=sums.device)
    packed = dist.all_reduce_sum(torch.cat([sums / accum, vote]))
    return (packed[:-1] / dist.world_size()).tolist(), bool(packed[-1].item() > 0)


def train_step(run: Run, stop_requested: bool) -> StepOutput:
    t0 = time.perf_counter()
    engine, state, callbacks, timer = run.engine, run.state, run.callbacks, run.timer
    trainer = run.cfg.trainer
    step_no = state.step + 1  # the step being computed, as it is logged
    log_step = step_no % trainer.log_every == 0 or step_no == trainer.max_steps
    timer.start_step(sync=log_step)
    callbacks.pre_step(state)
    lr = run.schedule.current_lr
    sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=engine.device)
    for micro_step in range(run.plan.accum):
        timer.begin("data")
        batch = next(run.loader)
        input_ids = batch["input_ids"].to(engine.device)
        labels = batch["labels"].to(engine.device)
        timer.end()
        timer.begin("forward")
        out = engine(input_ids, labels=labels)
        loss = run.faults.scale_loss(out.loss)
        timer.end()
        timer.begin("backward")
        engine.backward(loss)
        timer.end()
        dropped = (torch.stack([s.dropped_fraction.float() for s in out.router_stats]).mean()
                   if out.router_stats else out.loss.new_zeros(()))  # a dense model routes nothing
        sums += torch.stack([loss.detach(), out.lm_loss.detach(), out.aux_loss.detach(),
                             out.z_loss.detach(), dropped]).double()
        callbacks.post_micro_batch(state, out.router_stats)
        if micro_step == run.plan.accum - 1:
            timer.begin("health")
            values, stop_all = reduce_losses(sums, run.plan.accum, stop_requested)
            output = StepOutput(values[0], dict(zip(LOSS_KEYS, values, strict=True)),
                                list(out.router_stats), log_step=log_step, stop_requested=stop_all)
            callbacks.pre_optim_step(state, output)
            timer.end()
        timer.begin("step")
        engine.step()
        timer.end()
    output.applied = bool(engine.was_step_applied())
    state.step += 1
    state.tokens_seen += run.plan.tokens_per_step(run.cfg.data.seq_len)
    output.metrics.update({"train/lr": lr, "train/tokens_seen": float(state.tokens_seen),
                           "perf/step_time_s": time.perf_counter() - t0})
    if log_step:
        output.metrics.update(timer.metrics())
    callbacks.post_step(state, output)
    return output
