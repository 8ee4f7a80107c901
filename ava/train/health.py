"""Gradient health, the decision logic: classify every optimizer step *before* parameters change,
back the LR off after an incident, roll back after repeated incidents, stop after too many
rollbacks. Pure Python (no torch, no DeepSpeed): `ava.train.step_guard` is the DeepSpeed adapter
that skips a step, `ava.train.faults` the fault drills, `ava.train.health_callback` the piece
that ties them to the loop's hooks.

Classification, in this order (the first that applies wins):
    nonfinite_loss   the step's loss (mean over micro-batches and ranks) is NaN/inf
    nonfinite_grad   the global gradient norm (before clipping) is NaN/inf
    loss_spike       z = (loss - EMA mean) / EMA std above `loss_z_threshold`
    grad_spike       the same for the gradient norm and `grad_z_threshold`
Spikes are one-sided (only upward) and are looked for only after `warmup_steps` healthy steps;
the EMA statistics are updated with healthy steps only, so a spike does not hide the next one.
Every rank classifies the same all-reduced loss and the same global norm with the same
arithmetic, so all ranks reach the same verdict without another collective.

fp16 note: with a dynamic loss scale a non-finite gradient is usually a scale overflow; it is
classified `overflow` (skipped by DeepSpeed as always, no LR backoff, no incident).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

from ava.config import HealthConfig
from ava.observe.callbacks import CONTINUE, ROLLBACK, STOP

HEALTHY = "healthy"
NONFINITE_LOSS = "nonfinite_loss"
NONFINITE_GRAD = "nonfinite_grad"
LOSS_SPIKE = "loss_spike"
GRAD_SPIKE = "grad_spike"
OVERFLOW = "overflow"  # fp16 loss-scale overflow: skipped by DeepSpeed, not an incident



class UnhealthyRun(SystemExit):
    """Training cannot recover (too many rollbacks). A `SystemExit` with code 3, so the CLI ends
    with the logged diagnosis and no traceback; library callers can catch it."""

    def __init__(self, diagnosis: str) -> None:
        super().__init__(3)
        self.diagnosis = diagnosis

    def __str__(self) -> str:
        return self.diagnosis


@dataclass
class EmaStat:
    """Exponentially weighted mean and variance (West's update); `decay` weights the past."""

    decay: float
    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    def update(self, x: float) -> None:
        if self.count == 0:
            self.mean, self.var = x, 0.0
        else:
            alpha = 1.0 - self.decay
            delta = x - self.mean
            self.mean += alpha * delta
            self.var = self.decay * (self.var + alpha * delta * delta)
        self.count += 1

    def zscore(self, x: float, min_std_fraction: float) -> float:
        std = max(math.sqrt(self.var), min_std_fraction * abs(self.mean), 1e-12)
        return (x - self.mean) / std


@dataclass
class Verdict:
    kind: str
    loss: float
    grad_norm: Optional[float]
    loss_z: Optional[float] = None
    grad_z: Optional[float] = None

    @property
    def healthy(self) -> bool:
        return self.kind == HEALTHY

    @property
    def skip(self) -> bool:
        return self.kind != HEALTHY

    @property
    def incident(self) -> bool:
        return self.kind not in (HEALTHY, OVERFLOW)

    def value_and_z(self) -> Tuple[Optional[float], Optional[float]]:
        if self.kind in (NONFINITE_GRAD, GRAD_SPIKE):
            return self.grad_norm, self.grad_z
        return self.loss, self.loss_z


def _finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x)


@dataclass
class HealthMonitor:
    """The decision logic: no torch, no DeepSpeed; its `state_dict` goes into checkpoints."""

    cfg: HealthConfig
    fp16: bool = False
    loss_stat: EmaStat = field(init=False)
    grad_stat: EmaStat = field(init=False)
    attempts: int = 0  # optimizer steps attempted (= data windows consumed), never rewound
    incidents: int = 0
    skipped: int = 0
    rollbacks: int = 0
    streak: int = 0  # consecutive incidents
    streak_start: int = 0  # logged step number of the first incident of the current streak
    healthy_run: int = 0  # healthy steps since the last incident
    backoff_base: float = 1.0  # LR multiplier right after the last incident
    kinds: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loss_stat = EmaStat(self.cfg.ema_decay)
        self.grad_stat = EmaStat(self.cfg.ema_decay)

    # ---- per step
    def classify(self, loss: float, grad_norm: Optional[float]) -> Verdict:
        cfg = self.cfg
        v = Verdict(HEALTHY, loss, grad_norm)
        if not cfg.enabled:
            return v
        warmed = min(self.loss_stat.count, self.grad_stat.count) >= cfg.warmup_steps
        if warmed and math.isfinite(loss):
            v.loss_z = self.loss_stat.zscore(loss, cfg.min_std_fraction)
        if warmed and _finite(grad_norm):
            v.grad_z = self.grad_stat.zscore(grad_norm, cfg.min_std_fraction)  # type: ignore[arg-type]
        if not math.isfinite(loss):
            v.kind = NONFINITE_LOSS
        elif grad_norm is not None and not math.isfinite(grad_norm):
            v.kind = OVERFLOW if self.fp16 else NONFINITE_GRAD
        elif cfg.loss_z_threshold is not None and v.loss_z is not None \
                and v.loss_z > cfg.loss_z_threshold:
            v.kind = LOSS_SPIKE
        elif cfg.grad_z_threshold is not None and v.grad_z is not None \
                and v.grad_z > cfg.grad_z_threshold:
            v.kind = GRAD_SPIKE
        return v

    def update(self, v: Verdict, step: int) -> str:
        """Record the outcome of logged step `step`; returns continue, rollback or stop."""
        cfg = self.cfg
        if v.skip:
            self.skipped += 1
        if not v.incident:
            if v.healthy:
                self.loss_stat.update(v.loss)
                if _finite(v.grad_norm):
                    self.grad_stat.update(v.grad_norm)  # type: ignore[arg-type]
                self.healthy_run += 1
                self.streak = 0
            return CONTINUE
        self.incidents += 1
        self.kinds[v.kind] = self.kinds.get(v.kind, 0) + 1
        if self.streak == 0:
            self.streak_start = step
        self.streak += 1
        self.healthy_run = 0
        self.backoff_base = max(cfg.min_lr_multiplier, self.lr_multiplier * cfg.lr_backoff)
        if cfg.rollback_after and self.streak >= cfg.rollback_after:
            return STOP if self.rollbacks >= cfg.max_rollbacks else ROLLBACK
        return CONTINUE

    @property
    def lr_multiplier(self) -> float:
        """`backoff_base` for `recovery_after` healthy steps, then a linear ramp back to 1."""
        cfg = self.cfg
        ramp = self.healthy_run - cfg.recovery_after
        if self.backoff_base >= 1.0 or ramp <= 0:
            return self.backoff_base
        return min(1.0, self.backoff_base + (1.0 - self.backoff_base) * ramp / cfg.recovery_steps)

    def on_rollback(self) -> None:
        self.rollbacks += 1
        self.streak = 0

    def diagnosis(self, step: int) -> str:
        kinds = ", ".join(f"{k}={n}" for k, n in sorted(self.kinds.items())) or "none"
        return (f"training stopped at step {step}: {self.streak} consecutive unhealthy steps "
                f"after {self.rollbacks} rollback(s) (trainer.health.max_rollbacks="
                f"{self.cfg.max_rollbacks}, rollback_after={self.cfg.rollback_after}); "
                f"{self.incidents} incidents in {self.attempts} attempted steps ({kinds}), "
                f"LR multiplier {self.lr_multiplier:.3g}. The run diverges even after rolling "
                "back and skipping data: lower trainer.lr, check the data around the logged "
                "incident steps (events.jsonl), or raise trainer.grad_clip / warmup")

    def metrics(self) -> Dict[str, float]:
        return {"health/lr_multiplier": self.lr_multiplier, "health/incidents": float(self.incidents),
                "health/skipped_steps": float(self.skipped), "health/rollbacks": float(self.rollbacks)}

    # ---- checkpoint state
    def state_dict(self) -> Dict[str, Any]:
        return {"loss_stat": asdict(self.loss_stat), "grad_stat": asdict(self.grad_stat),
                "attempts": self.attempts, "incidents": self.incidents, "skipped": self.skipped,
                "rollbacks": self.rollbacks, "streak": self.streak,
                "streak_start": self.streak_start, "healthy_run": self.healthy_run,
                "backoff_base": self.backoff_base, "kinds": dict(self.kinds)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not state:
            return
        self.loss_stat = EmaStat(**state["loss_stat"])
        self.grad_stat = EmaStat(**state["grad_stat"])
        for key in ("attempts", "incidents", "skipped", "rollbacks", "streak", "streak_start",
                    "healthy_run"):
            setattr(self, key, int(state[key]))
        self.backoff_base = float(state["backoff_base"])
        self.kinds = dict(state.get("kinds") or {})
