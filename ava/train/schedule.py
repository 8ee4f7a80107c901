"""Learning-rate schedule: linear warmup to the peak, cosine decay to `min_lr`, then flat.

Pure functions of the step, so a resumed run recomputes exactly the same values; the
`LambdaLR` wrapper lets DeepSpeed step it and store it in the checkpoint.
"""

from __future__ import annotations

import math

import torch


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


class WarmupCosine:
    """`LambdaLR` multiplier (relative to the peak `lr`); a class so its settings are
    saved in the scheduler's `state_dict` (a lambda's would not be)."""

    def __init__(self, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> None:
        self.lr = lr
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps

    def __call__(self, step: int) -> float:
        return lr_at(step, lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                     decay_steps=self.decay_steps) / self.lr


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float,
                            warmup_steps: int, decay_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` over `optimizer` (whose param groups' `lr` must be the peak `lr`)."""
    fn = WarmupCosine(lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, decay_steps=decay_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
