"""The per-expert loop backend: gather an expert's tokens, run its FFN, add the weighted output.

On a CPU this beats the sorted grouped matmul once an expert gets more than a few hundred rows:
each expert's rows, activations and outputs stay in cache, and no `[T·K, H]` dispatch or combine
buffer is ever built. It is one autograd node with a hand-written backward, so per-expert weight
gradients land in slices of one `[E, ...]` buffer (autograd over `w[e]` would allocate a full
`[E, ...]` gradient per expert) and the Python overhead per expert is a few calls. It needs the
per-expert counts on the host (one sync per layer), which costs nothing on a CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def swiglu_forward(x: Tensor, w_gate_up: Tensor, w_down: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    """`(silu(x Wg) ⊙ x Wu) Wd` with `w_gate_up = [Wg | Wu]` (one GEMM for both); returns the
    output and what the backward needs (gate, up: views of the one `[n, 2I]` product)."""
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down, (gate, up)


def swiglu_backward(grad_y: Tensor, x: Tensor, saved: tuple[Tensor, ...], w_gate_up: Tensor,
                    w_down: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Gradients of `swiglu_forward`: `(grad_x, [grad_w_gate_up, grad_w_down])`.

    The gate and up gradients are written side by side into one `[n, 2I]` buffer, so `x`'s and
    `w_gate_up`'s gradients are one GEMM each against the fused weight.
    """
    gate, up = saved
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_w_down = (silu * up).t() @ grad_y
    grad_act = grad_y @ w_down.t()
    grad_gate_up = grad_act.new_empty(grad_act.shape[0], 2 * grad_act.shape[1])
    grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
    torch.mul(grad_act * up, sig * (1.0 + gate * (1.0 - sig)), out=grad_gate)
    torch.mul(grad_act, silu, out=grad_up)
    return grad_gate_up @ w_gate_up.t(), [x.t() @ grad_gate_up, grad_w_down]


def gelu_forward(x: Tensor, w1: Tensor, w2: Tensor, b1: Optional[Tensor], b2: Optional[Tensor]
                 ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """`gelu(x W1 + b1) W2 + b2`; returns the output and the pre-activation."""
    pre = x @ w1 if b1 is None else torch.addmm(b1, x, w1)
    act = F.gelu(pre)
    return (act @ w2 if b2 is None else torch.addmm(b2, act, w2)), (pre,)


def gelu_backward(grad_y: Tensor, x: Tensor, saved: tuple[Tensor, ...], w1: Tensor, w2: Tensor,
                  b1: Optional[Tensor], b2: Optional[Tensor]) -> tuple[Tensor, list[Optional[Tensor]]]:
    """Gradients of `gelu_forward`: `(grad_x, [grad_w1, grad_w2, grad_b1, grad_b2])`."""
    (pre,) = saved
    grad_w2 = F.gelu(pre).t() @ grad_y
    grad_pre = torch.ops.aten.gelu_backward(grad_y @ w2.t(), pre)
    grads = [x.t() @ grad_pre, grad_w2,
             None if b1 is None else grad_pre.sum(0), None if b2 is None else grad_y.sum(0)]
    return grad_pre @ w1.t(), grads


class _ExpertLoop(torch.autograd.Function):
    """`y_TH[t] = Σ_slots weight_S · FFN_e(x_TH[t])` over the kept slots, expert by expert.

    Slots are sorted by expert (`token_S`, `weight_S`, `counts` per expert); dropped slots are
    past `sum(counts)` and never touched. `params` are the stacked `[E, ...]` expert tensors in the
    order the activation's forward takes them (None for an absent bias).
    """

    @staticmethod
    def forward(ctx, activation, counts, x_TH, token_S, weight_S, *params):  # type: ignore[override]
        forward_fn = swiglu_forward if activation == "swiglu" else gelu_forward
        y_TH = torch.zeros_like(x_TH)
        active, saved, start = [], [], 0  # (expert, its rows) and (output, *activations) per active expert
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                y, keep = forward_fn(x_TH.index_select(0, token_S[rows]), *_expert(params, e))
                y_TH.index_add_(0, token_S[rows], y * weight_S[rows, None].to(y.dtype))
                active.append((e, rows))
                saved.extend((y, *keep))
            start += n
        ctx.activation, ctx.active, ctx.num_params = activation, active, len(params)
        # everything through save_for_backward (None for an absent bias), so activation
        # checkpointing's saved-tensor hooks also drop and recompute the per-expert activations
        ctx.save_for_backward(x_TH, token_S, weight_S, *params, *saved)
        return y_TH

    @staticmethod
    def backward(ctx, grad_TH):  # type: ignore[override]
        x_TH, token_S, weight_S, *rest = ctx.saved_tensors
        params, saved = rest[:ctx.num_params], rest[ctx.num_params:]
        per_expert = len(saved) // max(len(ctx.active), 1)
        backward_fn = swiglu_backward if ctx.activation == "swiglu" else gelu_backward
        grad_x = torch.zeros_like(x_TH)
        grad_weight_S = torch.zeros_like(weight_S)
        grad_params = [None if p is None else torch.zeros_like(p) for p in params]
        grad_TH = grad_TH.contiguous()
        for i, (e, rows) in enumerate(ctx.active):
            y, *keep = saved[i * per_expert:(i + 1) * per_expert]
            tokens = token_S[rows]
            grad_out = grad_TH.index_select(0, tokens)
            # multiply-then-sum: autograd's reduction order, so router gradients match the reference
            grad_weight_S[rows] = (y * grad_out).sum(dim=-1).to(weight_S.dtype)
            grad_y = grad_out * weight_S[rows, None].to(grad_out.dtype)
            gx, gp = backward_fn(grad_y, x_TH.index_select(0, tokens), tuple(keep), *_expert(params, e))
            grad_x.index_add_(0, tokens, gx)
            for buf, g in zip(grad_params, gp, strict=True):
                if buf is not None:
                    buf[e] = g
        return (None, None, grad_x, None, grad_weight_S, *grad_params)


def _expert(params: tuple[Optional[Tensor], ...], e: int) -> list[Optional[Tensor]]:
    return [None if p is None else p[e] for p in params]


def expert_loop(x_TH: Tensor, token_S: Tensor, weight_S: Tensor, counts: list[int], activation: str,
                params: tuple[Optional[Tensor], ...]) -> Tensor:
    """Kept slots sorted by expert (`counts[e]` for expert e, dropped slots after them) through
    their experts, weighted and summed per token."""
    return _ExpertLoop.apply(activation, counts, x_TH, token_S, weight_S, *params)
