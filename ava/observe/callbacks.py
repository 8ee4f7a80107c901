"""The loop's one plug-in interface (OLMo-core style): monitors, sinks, gradient health and
checkpointing are all `Callback`s, each with its own state.

Hooks, in the order `ava.train.loop.fit` calls them:
    on_train_start(state)                  model, data, engine ready; resume done
    pre_step(state)                        before the first micro-batch of a step
    post_micro_batch(state, router_stats)  after each micro-batch's backward (on-device stats:
                                           accumulate, do not sync)
    pre_optim_step(state, output)          after the last backward, before `engine.step()`;
                                           `output.loss` is reduced over ranks (health decides
                                           here whether the step is applied)
    post_step(state, output)               after the step; extend `output.metrics`, append to
                                           `output.events`, set `output.action`
    log_metrics(state, metrics, step)      rank 0 sinks: a step's (or an evaluation's) metrics
    on_event(state, record)                rank 0 sinks: an incident, alert, rollback or stop
    on_eval(state, metrics)                after a validation pass
    on_step_end(state)                     the step is complete (checkpointing saves here)
    post_checkpoint_saved(state, tag_dir)  after a checkpoint is complete on every rank
    on_train_end(state)                    after the last step (also after an early stop)
    close()                                always, last (sinks flush and close)
Within a hook, callbacks run in list order: Ava's own (health, experts, throughput, memory),
then the user's (`trainer.callbacks` in config, or `build_run(callbacks=...)`), then
checkpointing and the sinks. `state_dict()` / `load_state_dict()` are saved in and restored
from every checkpoint, keyed by `name`. Every rank calls every hook; a callback that logs must
check `state.rank == 0` (sinks exist on rank 0 only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

CONTINUE, ROLLBACK, STOP = "continue", "rollback", "stop"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # training tokens over all ranks
    max_steps: int = 0
    rank: int = 0
    world_size: int = 1
    run_dir: Optional[Path] = None
    first_val_loss: Optional[float] = None
    last_val_loss: Optional[float] = None
    stopping: bool = False  # a rank was asked to stop (SIGINT/SIGTERM): save and end
    last_saved: int = -1  # step of the newest checkpoint this process saved or restored


@dataclass
class StepOutput:
    """One optimizer step as the callbacks see it."""

    loss: float  # mean over micro-batches and ranks
    metrics: Dict[str, float] = field(default_factory=dict)
    router_stats: List[Any] = field(default_factory=list)  # last micro-batch, per layer
    events: List[Dict[str, Any]] = field(default_factory=list)  # {"event": ..., "step": ...}
    applied: bool = True  # False: the optimizer step was skipped (unhealthy or overflow)
    log_step: bool = False  # a `trainer.log_every` step: monitors report
    stop_requested: bool = False  # any rank was asked to stop
    action: str = CONTINUE  # set by gradient health: continue, rollback or stop
    diagnosis: str = ""  # why, for a stop


class Callback:
    name: str = "callback"

    def on_train_start(self, state: TrainState) -> None: ...

    def pre_step(self, state: TrainState) -> None: ...

    def post_micro_batch(self, state: TrainState, router_stats: List[Any]) -> None: ...

    def pre_optim_step(self, state: TrainState, output: StepOutput) -> None: ...

    def post_step(self, state: TrainState, output: StepOutput) -> None: ...

    def log_metrics(self, state: TrainState, metrics: Mapping[str, Any], step: int) -> None: ...

    def on_event(self, state: TrainState, record: Mapping[str, Any]) -> None: ...

    def on_eval(self, state: TrainState, metrics: Dict[str, float]) -> None: ...

    def on_step_end(self, state: TrainState) -> None: ...

    def post_checkpoint_saved(self, state: TrainState, tag_dir: Path) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...

    def close(self) -> None: ...

    def summary(self) -> str:
        """A line for the run's last lines (where a sink's output went), or ""."""
        return ""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


HOOKS = frozenset(name for name in vars(Callback) if not name.startswith("_")
                  and name not in ("name", "summary", "state_dict", "load_state_dict"))


class CallbackList:
    """Fans every hook out to its callbacks, in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        names = [cb.name for cb in self.callbacks]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:  # checkpoint state is keyed by name
            raise ValueError(f"callbacks share the name(s) {clash}: give each its own `name`")

    def __getattr__(self, hook: str) -> Any:
        if hook not in HOOKS:
            raise AttributeError(hook)

        def fan_out(*args: Any) -> None:
            for cb in self.callbacks:
                getattr(cb, hook)(*args)

        return fan_out

    def state_dict(self) -> Dict[str, Any]:
        return {cb.name: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for cb in self.callbacks:
            if cb.name in state:
                cb.load_state_dict(state[cb.name])
