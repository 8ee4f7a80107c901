"""Fault drills (`trainer.health.inject`, tests and rehearsals only): NaN into one gradient, a loss
spike, a SIGKILL in the middle of a checkpoint save, or a rank that exits, on one rank."""

from __future__ import annotations

import logging
import os
import signal
from typing import Optional

import torch

from ava.config import InjectConfig

log = logging.getLogger("ava.train")


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
