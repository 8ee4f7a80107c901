"""One optimizer step: the micro-batches' forward/backward, one all-reduce of the losses and
the stop vote, the hooks around `engine.step()`.

With loss masks (chat data) micro-batches hold different numbers of target tokens, and DeepSpeed
averages per-micro-batch means over micro-batches and ranks: each micro-batch's LM loss is
weighted first (`target_weights`), so the step's loss is the mean over every target token of
the global batch, whatever the accumulation and world size.

Gradient health decides in `pre_optim_step` (before parameters change) whether the step is
applied; DeepSpeed's `was_step_applied()` says what happened; `post_step` callbacks add their
metrics and set the loop's action.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, List, Tuple

import torch

from ava import dist
from ava.config import IGNORE_INDEX
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


def target_weights(counts: torch.Tensor, global_count: torch.Tensor, world_size: int) -> torch.Tensor:
    """Factors on the micro-batches' mean LM losses that turn the mean over `len(counts)`
    micro-batches and `world_size` ranks into the mean over all `global_count` target tokens:
    n_i · accum · world / N (exactly 1 when every micro-batch holds N / (accum · world))."""
    return counts * (counts.numel() * world_size) / global_count.clamp_min(1)


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
    timer.begin("data")
    batches = [{k: v.to(engine.device) for k, v in next(run.loader).items()} for _ in range(run.plan.accum)]
    weights = None
    if run.data.kind == "chat":  # plain text: every micro-batch holds micro x seq_len targets
        counts = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in batches]).double()
        weights = target_weights(counts, dist.all_reduce_sum(counts.sum()), dist.world_size())
    timer.end()
    for micro_step, batch in enumerate(batches):
        timer.begin("forward")
        out = engine(**batch)
        lm_loss = out.lm_loss if weights is None else out.lm_loss * weights[micro_step].to(out.lm_loss.dtype)
        loss = run.faults.scale_loss(out.loss + (lm_loss - out.lm_loss))
        timer.end()
        timer.begin("backward")
        engine.backward(loss)
        timer.end()
        dropped = (torch.stack([s.dropped_fraction.float() for s in out.router_stats]).mean()
                   if out.router_stats else out.loss.new_zeros(()))  # a dense model routes nothing
        sums += torch.stack([loss.detach(), lm_loss.detach(), out.aux_loss.detach(),
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
