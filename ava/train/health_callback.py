"""Gradient health on the loop's hooks: the decision logic (`ava.train.health`), the DeepSpeed
adapter that skips a step (`ava.train.step_guard`) and the fault drills (`ava.train.faults`).

    pre_step        count the attempt; arm this step's fault drill
    pre_optim_step  take the global gradient norm, classify the reduced loss and norm; arm the
                    skip for an unhealthy step (and record the largest per-parameter norms)
    post_step       check DeepSpeed did what was decided; update the statistics; hand the LR
                    multiplier to the schedule; add metrics and the incident event; set the
                    loop's action: continue, rollback or stop
Its state (spike statistics, counters, backoff) is saved in every checkpoint.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Tuple

from ava.config import HealthConfig
from ava.observe.callbacks import STOP, Callback, StepOutput, TrainState
from ava.train.faults import FaultInjector
from ava.train.health import HealthMonitor, Verdict
from ava.train.schedule import Schedule
from ava.train.step_guard import StepGuard

log = logging.getLogger("ava.train")

class HealthCallback(Callback):
    name = "health"

    def __init__(self, cfg: HealthConfig, engine: Any, schedule: Schedule, faults: FaultInjector) -> None:
        self.cfg = cfg
        self.monitor = HealthMonitor(cfg, fp16=bool(engine.fp16_enabled()))
        self.guard = StepGuard(engine)
        self.engine = engine
        self.schedule = schedule
        self.faults = faults
        self._verdict: Optional[Verdict] = None
        self._worst: List[Tuple[str, float]] = []

    def pre_step(self, state: TrainState) -> None:
        self.monitor.attempts += 1
        self.faults.begin_step(self.monitor.attempts)

    def pre_optim_step(self, state: TrainState, output: StepOutput) -> None:
        verdict = self.monitor.classify(output.loss, self.guard.grad_norm())
        self._worst = []
        if verdict.skip:
            if verdict.incident:  # collective under ZeRO: every rank reaches the same verdict
                self._worst = self.guard.layer_grad_norms(self.cfg.worst_layers)
            self.guard.skip_next_step()
        self._verdict = verdict

    def post_step(self, state: TrainState, output: StepOutput) -> None:
        verdict, step = self._verdict, state.step
        assert verdict is not None, "post_step without pre_optim_step"
        self.guard.after_step()
        if verdict.skip and output.applied:
            raise RuntimeError(f"step {step} was classified {verdict.kind} but DeepSpeed "
                               "applied it: the skip hook did not take effect")
        monitor = self.monitor
        output.action = monitor.update(verdict, step)
        self.schedule.set_multiplier(monitor.lr_multiplier)
        output.metrics["train/grad_norm"] = verdict.grad_norm if verdict.grad_norm is not None else math.nan
        output.metrics["health/skipped"] = float(not output.applied)
        output.metrics.update(monitor.metrics())
        if verdict.loss_z is not None:
            output.metrics["health/loss_z"] = verdict.loss_z
        if verdict.grad_z is not None:
            output.metrics["health/grad_z"] = verdict.grad_z
        if verdict.incident:
            value, z = verdict.value_and_z()
            output.events.append({
                "event": "incident", "step": step, "kind": verdict.kind, "value": value, "z": z,
                "loss": verdict.loss, "grad_norm": verdict.grad_norm,
                "lr_multiplier": monitor.lr_multiplier, "consecutive": monitor.streak,
                "attempt": monitor.attempts, "worst_grad_norms": self._worst})
        if output.action == STOP:
            output.diagnosis = monitor.diagnosis(step)
            if state.rank == 0:
                log.error("%s", output.diagnosis)
            output.events.append({"event": "stop", "step": step, "title": "Training stopped",
                                  "text": output.diagnosis})
        self._verdict = None

    def rollback_started(self) -> int:
        """Count a rollback; returns the first step of the incident streak it undoes."""
        first_bad = self.monitor.streak_start
        self.monitor.on_rollback()
        return first_bad

    def state_dict(self) -> Dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)
        self.schedule.set_multiplier(self.monitor.lr_multiplier)
