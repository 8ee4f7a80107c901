"""The learning rate, owned in one place: linear warmup, cosine decay to `min_lr`, then flat,
times the gradient-health multiplier.

`lr_at` is a pure function of the step, so a resumed run recomputes exactly the same values.
`Schedule` is the LR scheduler DeepSpeed steps (after applied optimizer steps only, so skipped
steps do not advance it) and saves in its checkpoints; the settings always come from the
configuration (after a resume with a changed schedule the new settings win), only the position
comes from the checkpoint. The health callback hands it the multiplier after every verdict.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List

import torch

from ava.config import TrainerConfig

log = logging.getLogger("ava.train")


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update uses `lr_at(0)`).

    Warmup: `lr * (step + 1) / warmup_steps` for `step < warmup_steps` (never exactly 0).
    Then a half cosine from `lr` at `warmup_steps` to `min_lr` at `decay_steps`; `min_lr` after.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps or decay_steps <= warmup_steps:
        return min_lr
    progress = (step - warmup_steps) / (decay_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class ScheduleSettings:
    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int

    @classmethod
    def of(cls, trainer: TrainerConfig) -> ScheduleSettings:
        return cls(trainer.lr, trainer.min_lr, trainer.warmup_steps, trainer.decay_steps or trainer.max_steps)

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


class Schedule(torch.optim.lr_scheduler.LRScheduler):
    """`lr_at(applied steps) x multiplier` for every param group. Its checkpoint state is the
    position alone (plus the settings, to say when they changed)."""

    def __init__(self, optimizer: torch.optim.Optimizer, settings: ScheduleSettings) -> None:
        self.settings = settings
        self.multiplier = 1.0
        super().__init__(optimizer)

    def get_lr(self) -> List[float]:  # type: ignore[override]
        value = lr_at(self.last_epoch, **self.settings.as_dict()) * self.multiplier
        return [value for _ in self.optimizer.param_groups]

    def set_multiplier(self, multiplier: float) -> None:
        """The health monitor's factor, applied at once to the next update (no step taken)."""
        self.multiplier = multiplier
        self.refresh()

    def refresh(self) -> None:
        for group, value in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = value
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    @property
    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> Dict[str, Any]:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count,
                "settings": self.settings.as_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self._step_count = int(state.get("_step_count", self.last_epoch + 1))
        saved = state.get("settings")
        if saved and saved != self.settings.as_dict():
            log.warning("LR schedule changed since the checkpoint: %s -> %s; using the new one", saved,
                        self.settings.as_dict())
        self.refresh()


def schedule_factory(trainer: TrainerConfig) -> Any:
    """What `deepspeed.initialize(lr_scheduler=...)` calls with the optimizer it built."""
    settings = ScheduleSettings.of(trainer)
    return lambda optimizer: Schedule(optimizer, settings)
