"""Gradient health: classify every optimizer step *before* parameters change, skip unhealthy
ones, back the LR off, roll back after repeated incidents, stop after too many rollbacks.

Pure logic (`EmaStat`, `HealthMonitor`) plus a thin DeepSpeed adapter (`StepGuard`) and the
test-only fault injector (`FaultInjector`, `trainer.health.inject`).

Classification, in this order (the first that applies wins):
    nonfinite_loss   the step's loss (mean over micro-batches and ranks) is NaN/inf
    nonfinite_grad   the global gradient norm (before clipping) is NaN/inf
    loss_spike       z = (loss - EMA mean) / EMA std above `loss_z_threshold`
    grad_spike       the same for the gradient norm and `grad_z_threshold`
Spikes are one-sided (only upward) and are looked for only after `warmup_steps` healthy steps;
the EMA statistics are updated with healthy steps only, so a spike does not hide the next one.
Every rank classifies the same all-reduced loss and the same global norm with the same
arithmetic, so all ranks reach the same verdict without another collective.

How a step is skipped (DeepSpeed 0.19.8). DeepSpeed already has a "skip this step" path, the
loss-scale overflow path: `engine._take_model_step` calls `optimizer.step()`, then reads
`optimizer.overflow`; when it is set, the LR scheduler is not stepped, `skipped_steps` is
incremented and `was_step_applied()` is False; the ZeRO optimizers clear the gradients and
return before touching the fp32 master weights or the inner optimizer (so Adam's moments and
step counters stay as they were). `StepGuard` makes DeepSpeed take that path for a step that
Ava classified unhealthy, per optimizer wrapper:
  - ZeRO 1/2 (`DeepSpeedZeroOptimizer`) and ZeRO 3 (`DeepSpeedZeroOptimizer_Stage3`): both call
    `self._update_scale(self.overflow)` right after their own overflow/norm check and branch on
    `self.overflow` right after it. The guard wraps `_update_scale` on the instance: it calls
    the original with DeepSpeed's own verdict (a dynamic fp16 loss scale only reacts to real
    overflows) and then sets `overflow = True` for a step to skip. DeepSpeed's own overflow
    branch then clears the gradients (`zero_grad`, averaged/partitioned gradient buffers).
  - ZeRO 0 (the plain torch optimizer, or DeepSpeed's fp16/bf16 wrappers): the guard wraps
    `optimizer.step` on the instance: for a step to skip it sets `overflow = True` and returns
    without stepping; the engine then zeroes the gradients as after any step.
The pre-step global norm reuses DeepSpeed's own computation: under ZeRO 1/2 the guard calls
`scaled_global_norm()` (ZeRO 3: `_get_norm_groups()`) before `engine.step()` and hands the same
tensor back when the optimizer asks for it inside `step()`, so the norm (and its all-reduce) is
computed once per step, as before. Under ZeRO 0 the gradients are already all-reduced: the norm
is one fused `_foreach_norm` over them. After `engine.step()` the loop checks
`engine.was_step_applied()` against the verdict and fails loudly if they disagree.

fp16 note: with a dynamic loss scale a non-finite gradient is usually a scale overflow; it is
classified `overflow` (skipped by DeepSpeed as always, no LR backoff, no incident).
"""

from __future__ import annotations

import logging
import math
import os
import signal
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ava.config import HealthConfig, InjectConfig

log = logging.getLogger("ava.train")

HEALTHY = "healthy"
NONFINITE_LOSS = "nonfinite_loss"
NONFINITE_GRAD = "nonfinite_grad"
LOSS_SPIKE = "loss_spike"
GRAD_SPIKE = "grad_spike"
OVERFLOW = "overflow"  # fp16 loss-scale overflow: skipped by DeepSpeed, not an incident

CONTINUE, ROLLBACK, STOP = "continue", "rollback", "stop"


class UnhealthyRun(SystemExit):
    """Training cannot recover (too many rollbacks). A `SystemExit` with code 3, so the CLI ends
    with the logged diagnosis and no traceback; library callers can catch it."""

    def __init__(self, diagnosis: str) -> None:
        super().__init__(3)
        self.diagnosis = diagnosis

    def __str__(self) -> str:
        return self.diagnosis


# --------------------------------------------------------------------------- pure logic

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


# --------------------------------------------------------------------------- DeepSpeed adapter

class StepGuard:
    """Installs the skip hooks on `engine.optimizer` (see the module docstring) and computes the
    global gradient norm before `engine.step()`. Every rank must call `grad_norm()` and
    `layer_grad_norms()` (they are collective under ZeRO)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.opt = opt = engine.optimizer
        self._skip = False
        self._memo: Any = None
        self.fp16 = bool(engine.fp16_enabled())
        if hasattr(opt, "_update_scale") and hasattr(opt, "scaled_global_norm"):
            self.kind = "zero12"
            self._wrap("scaled_global_norm", self._memoised)
        elif hasattr(opt, "_update_scale") and hasattr(opt, "_get_norm_groups"):
            self.kind = "zero3"
            self._wrap("_get_norm_groups", self._memoised)
        else:
            self.kind = "plain"
        if self.kind == "plain":
            if not hasattr(opt, "overflow"):
                opt.overflow = False
            self._wrap("step", self._plain_step)
        else:
            self._wrap("_update_scale", self._update_scale)

    def _wrap(self, name: str, wrapper: Callable[..., Any]) -> None:
        original = getattr(self.opt, name)

        def hooked(*args: Any, **kwargs: Any) -> Any:
            return wrapper(original, *args, **kwargs)

        setattr(self.opt, name, hooked)

    # ---- hooks (called by DeepSpeed inside engine.step())
    def _memoised(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._memo is not None:
            value, self._memo = self._memo, None
            return value
        return original(*args, **kwargs)

    def _update_scale(self, original: Callable[..., Any], has_overflow: bool = False) -> None:
        original(has_overflow)
        if self._skip:
            self.opt.overflow = True

    def _plain_step(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._skip:
            self.opt.overflow = True
            return None
        if type(self.opt).__module__.startswith("torch."):
            self.opt.overflow = False  # DeepSpeed's fp16/bf16 wrappers set it themselves
        return original(*args, **kwargs)

    # ---- called by the loop
    def _loss_scale(self) -> float:
        scale = getattr(self.opt, "loss_scale", None) or getattr(self.opt, "cur_scale", None)
        return float(scale) if scale else 1.0

    def _params(self) -> List[Tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]

    def grad_norm(self) -> float:
        """Global L2 norm of this step's (averaged, unclipped) gradients; NaN/inf if any is."""
        if self.kind == "zero12":
            self._memo = self.opt.scaled_global_norm()
            norm = self._memo
        elif self.kind == "zero3":
            from deepspeed.runtime.utils import combine_grad_norm_groups

            self._memo = self.opt._get_norm_groups()
            norm = combine_grad_norm_groups(self._memo)
        else:
            from deepspeed.utils import safe_get_full_grad

            grads = [g for _, p in self._params() if (g := safe_get_full_grad(p)) is not None]
            if not grads:
                return 0.0
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        value = float(norm) / self._loss_scale()
        return value if value >= 0 else math.inf  # DeepSpeed's -1 sentinel: a NaN/inf group

    def layer_grad_norms(self, top: int) -> List[Tuple[str, float]]:
        """The `top` largest per-parameter gradient norms (non-finite first), for an incident."""
        from deepspeed.utils import safe_get_full_grad

        norms = []
        for name, param in self._params():
            grad = safe_get_full_grad(param)
            if grad is not None:
                norms.append((name, float(torch.linalg.vector_norm(grad.float()))))
        norms.sort(key=lambda item: math.inf if not math.isfinite(item[1]) else item[1],
                   reverse=True)
        return norms[:top]

    def skip_next_step(self) -> None:
        self._skip = True

    def after_step(self) -> None:
        self._skip = False
        self._memo = None


# --------------------------------------------------------------------------- fault injection

class FaultInjector:
    """`trainer.health.inject` (tests and fault drills): NaN into one gradient, a loss spike, a
    SIGKILL in the middle of a checkpoint save, or a rank that exits, on one rank."""

    def __init__(self, cfg: InjectConfig, rank: int) -> None:
        self.cfg = cfg
        self.enabled = cfg.kind is not None and rank == cfg.rank
        self.active = False
        self.param_name: Optional[str] = None

    def attach(self, module: torch.nn.Module) -> None:
        if not self.enabled or self.cfg.kind != "nan_grad":
            return
        for name, param in module.named_parameters():
            if self.cfg.param in name and param.requires_grad:
                self.param_name = name
                param.register_hook(self._nan_hook)
                log.warning("fault injection: NaN into the gradient of %s at steps %s",
                            name, list(self.cfg.steps))
                return
        raise ValueError(f"trainer.health.inject.param={self.cfg.param!r} matches no parameter")

    def begin_step(self, attempt: int) -> None:
        self.active = self.enabled and attempt in self.cfg.steps
        if self.active and self.cfg.kind == "exit":
            log.error("fault injection: rank %d exits (os._exit(1)) at step %d", self.cfg.rank,
                      attempt)
            logging.shutdown()
            os._exit(1)

    def during_save(self, step: int) -> None:
        """Called by every rank once its checkpoint files are written, before the manifest."""
        if self.enabled and self.cfg.kind == "kill_during_save" and step in self.cfg.steps:
            log.error("fault injection: SIGKILL to rank %d while saving step %d", self.cfg.rank,
                      step)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def _nan_hook(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        if self.active and self.cfg.kind == "loss_spike":
            return loss * self.cfg.scale
        return loss
