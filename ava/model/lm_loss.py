"""The language-model loss through the LM head, chunk by chunk: the `[N, V]` logits are never
materialised in training.

At vocabulary 65,536 and 1,024 tokens a step's fp32 logits are 256 MiB, and autograd keeps them,
their log-softmax and its gradient alive at once. Here each chunk of rows computes its logits,
its loss and at once its gradients (the loss is a scalar, so d loss / d logits = softmax −
one-hot is known in the forward); only `d x [N, H]` and `d W [V, H]` are kept, and the backward
scales them by the incoming gradient. The FLOPs are those of the unfused head.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ava.config import IGNORE_INDEX
from ava.model.precision import autocast_dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NH, weight_VH, labels_N, chunk_rows):  # type: ignore[override]
        valid_N = labels_N != IGNORE_INDEX
        scale = 1.0 / valid_N.sum().clamp_min(1).to(torch.float32)  # mean over targets; none: loss 0
        grad_x = torch.empty_like(x_NH)
        grad_w = torch.zeros_like(weight_VH, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=x_NH.device)
        for start in range(0, x_NH.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            x, valid = x_NH[rows], valid_N[rows]
            target = labels_N[rows].clamp_min(0)[:, None]
            logits = (x @ weight_VH.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, target).squeeze(1)) * valid).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad.scatter_add_(1, target, -valid[:, None].to(grad.dtype))
            grad.mul_(valid[:, None])
            grad = grad.to(x_NH.dtype)
            torch.mm(grad, weight_VH, out=grad_x[rows])
            grad_w.addmm_(grad.t().to(torch.float32), x.to(torch.float32))
        ctx.save_for_backward(grad_x, grad_w, scale)
        ctx.weight_dtype = weight_VH.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_x, grad_w, scale = ctx.saved_tensors
        k = grad_loss * scale
        return grad_x * k.to(grad_x.dtype), (grad_w * k).to(ctx.weight_dtype), None, None


def linear_cross_entropy(x_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor,
                         chunk_rows: int) -> torch.Tensor:
    """`cross_entropy(x @ W.T, labels, ignore_index=-100)` (mean over target rows, 0 when there
    are none), `chunk_rows` rows of logits at a time; under autocast in its dtype (the logits and
    the softmax in fp32, as autocast computes cross-entropy)."""
    dtype = autocast_dtype(x_NH.device.type)
    if dtype is None:
        return _LinearCrossEntropy.apply(x_NH, weight_VH, labels_N, chunk_rows)
    with torch.autocast(x_NH.device.type, enabled=False):
        return _LinearCrossEntropy.apply(x_NH.to(dtype), weight_VH.to(dtype), labels_N, chunk_rows)


class LMHead(nn.Linear):
    """The untied output projection. Given labels it returns the chunked loss instead of logits:
    the head stays one module call either way, so ZeRO-3's hooks gather its partitioned weight."""

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None,  # type: ignore[override]
                chunk_rows: int = 0) -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        return linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.weight, labels.reshape(-1), chunk_rows)
