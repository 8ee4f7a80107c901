"""The loop's hook interface (OLMo-core style): monitors as callbacks with their own state.

Hooks, in the order the loop calls them:
    on_train_start(state)                  after model, data, engine and resume are ready
    pre_step(state)                        before the first micro-batch of a step
    post_micro_batch(state, router_stats)  after each micro-batch's backward (on-device stats:
                                           accumulate, do not sync)
    pre_optim_step(state, engine)          after the last backward, before the optimizer step
    post_step(state, output)               after the step; `output.metrics` may be extended,
                                           `output.events` appended to (alerts, incidents)
    on_eval(state, metrics)                after a validation pass
    post_checkpoint_saved(state, tag_dir)  after a checkpoint is complete on every rank
    on_train_end(state)
`state_dict()` / `load_state_dict()` are saved in and restored from every checkpoint (keyed by
`name`). Every rank calls every hook; a callback that logs must check `state.rank == 0`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # training tokens over all ranks
    max_steps: int = 0
    rank: int = 0
    world_size: int = 1
    run_dir: Optional[Path] = None


@dataclass
class StepOutput:
    """One optimizer step: the model outputs of its micro-batches and the reduced metrics."""

    loss: float
    metrics: Dict[str, float] = field(default_factory=dict)
    router_stats: List[Any] = field(default_factory=list)  # last micro-batch, per layer
    events: List[Dict[str, Any]] = field(default_factory=list)  # {"event": ..., "step": ...}
    applied: bool = True  # False: the optimizer step was skipped (unhealthy or overflow)


class Callback:
    name: str = "callback"

    def on_train_start(self, state: TrainState) -> None: ...

    def pre_step(self, state: TrainState) -> None: ...

    def post_micro_batch(self, state: TrainState, router_stats: List[Any]) -> None: ...

    def pre_optim_step(self, state: TrainState, engine: Any) -> None: ...

    def post_step(self, state: TrainState, output: StepOutput) -> None: ...

    def on_eval(self, state: TrainState, metrics: Dict[str, float]) -> None: ...

    def post_checkpoint_saved(self, state: TrainState, tag_dir: Path) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


class CallbackList(Callback):
    """Fans every hook out to its callbacks, in order."""

    name = "callbacks"

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_train_start(state)

    def pre_step(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.pre_step(state)

    def post_micro_batch(self, state: TrainState, router_stats: List[Any]) -> None:
        for cb in self.callbacks:
            cb.post_micro_batch(state, router_stats)

    def pre_optim_step(self, state: TrainState, engine: Any) -> None:
        for cb in self.callbacks:
            cb.pre_optim_step(state, engine)

    def post_step(self, state: TrainState, output: StepOutput) -> None:
        for cb in self.callbacks:
            cb.post_step(state, output)

    def on_eval(self, state: TrainState, metrics: Dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_eval(state, metrics)

    def post_checkpoint_saved(self, state: TrainState, tag_dir: Path) -> None:
        for cb in self.callbacks:
            cb.post_checkpoint_saved(state, tag_dir)

    def on_train_end(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_train_end(state)

    def state_dict(self) -> Dict[str, Any]:
        return {cb.name: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for cb in self.callbacks:
            if cb.name in state:
                cb.load_state_dict(state[cb.name])
