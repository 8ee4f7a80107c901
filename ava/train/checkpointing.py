"""Checkpointing on the loop's hooks, and what a checkpoint holds besides DeepSpeed's state.

Every checkpoint's client state (in DeepSpeed's model-states file, one copy):
    step, tokens_seen, world_size       where the run is
    schedule                            the LR settings it was saved with (resume says if they changed)
    data_fingerprint                    which token stream the loader positions point into
    config                              the resolved configuration (ava-export reads the model from it)
    val_losses                          first and last validation loss
    health                              gradient-health statistics and counters
    callbacks                           every other callback's `state_dict()`, by name
and per rank `ava_rank_NNNNN.pt`: the RNG states and the loader position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict

from ava.observe.callbacks import Callback, TrainState
from ava.train.checkpoint import capture_rng
from ava.train.elastic import universal_info
from ava.train.schedule import ScheduleSettings

if TYPE_CHECKING:
    from ava.train.run import Run

HEALTH_KEY = "health"


def client_state(run: Run) -> Dict[str, Any]:
    callbacks = run.callbacks.state_dict()
    return {"step": run.state.step, "tokens_seen": run.state.tokens_seen,
            "world_size": run.plan.world_size,
            "schedule": ScheduleSettings.of(run.cfg.trainer).as_dict(),
            "data_fingerprint": run.data.fingerprint, "config": run.resolved_config,
            "val_losses": {"first": run.state.first_val_loss, "last": run.state.last_val_loss},
            HEALTH_KEY: callbacks.pop(HEALTH_KEY, {}), "callbacks": callbacks,
            # DeepSpeed's expert-parallel engines write this entry themselves (and refuse it here)
            **(universal_info() if run.plan.expert_parallel is None else {})}


def callback_states(client: Dict[str, Any]) -> Dict[str, Any]:
    """`client_state`'s callback states, by name (the inverse of the split above)."""
    return {**(client.get("callbacks") or {}), HEALTH_KEY: client.get(HEALTH_KEY) or {}}


def save_checkpoint(run: Run) -> None:
    state = run.state
    tag_dir = run.checkpoints.save(
        run.engine, state.step, client_state(run),
        {"rng": capture_rng(), "loader": run.loader.state_dict(), "step": state.step},
        files_written=run.faults.during_save,
        meta={"data_fingerprint": run.data.fingerprint,
              "expert_parallel_size": run.cfg.trainer.expert_parallel_size,
              # the layout an elastic resume needs to keep the global batch
              "micro_batch_size": run.plan.micro, "grad_accum_steps": run.plan.accum,
              "zero_stage": run.plan.zero_stage})
    state.last_saved = state.step
    run.callbacks.post_checkpoint_saved(state, tag_dir)


class Checkpointing(Callback):
    """Saves every `trainer.save_every` steps, when the run is asked to stop, and at the end
    (`trainer.save_at_end`) unless the last step was just saved."""

    name = "checkpointing"

    def __init__(self, save: Callable[[], None], *, save_every: int, save_at_end: bool) -> None:
        self.save, self.save_every, self.save_at_end = save, save_every, save_at_end

    def on_step_end(self, state: TrainState) -> None:
        if state.stopping or (self.save_every and state.step % self.save_every == 0):
            self.save()

    def on_train_end(self, state: TrainState) -> None:
        if self.save_at_end and not state.stopping and state.last_saved != state.step:
            self.save()
