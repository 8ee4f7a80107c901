"""The DeepSpeed adapter of gradient health: skip a step through DeepSpeed's own path, and take
the pre-step gradient norm from DeepSpeed's own computation. The only module that touches
DeepSpeed's private optimizer methods (checked against the tested versions by
`ava.train.ds_compat`).

How a step is skipped. DeepSpeed already has a "skip this step" path, the loss-scale overflow
path: `engine._take_model_step` calls `optimizer.step()`, then reads `optimizer.overflow`; when
it is set, the LR scheduler is not stepped, `skipped_steps` is incremented and
`was_step_applied()` is False; the ZeRO optimizers clear the gradients and return before touching
the fp32 master weights or the inner optimizer (so Adam's moments and step counters stay as they
were). `StepGuard` makes DeepSpeed take that path for a step that Ava classified unhealthy, per
optimizer wrapper:
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
computed once per step. Under ZeRO 0 the gradients are already all-reduced: the norm is one
fused `_foreach_norm` over them. After `engine.step()` the caller checks
`engine.was_step_applied()` against the verdict and fails loudly if they disagree.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Tuple

import torch


class StepGuard:
    """Installs the skip hooks on `engine.optimizer` (see the module docstring) and computes the
    global gradient norm before `engine.step()`. Every rank must call `grad_norm()` and
    `layer_grad_norms()` (they are collective under ZeRO)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.opt = opt = engine.optimizer
        self._skip = False
        self._memo: Any = None
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
