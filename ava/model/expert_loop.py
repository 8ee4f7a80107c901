"""The per-expert loop backend: each expert's GEMMs over its own rows, one autograd node per layer.

On a CPU this beats the sorted grouped matmul once an expert gets more than a few hundred rows: each
expert's rows, activations and outputs stay in cache from its gather to its weighted add, and no
`[T·K, H]` dispatch or combine buffer is built. It has a hand-written backward, so per-expert weight
gradients land in slices of one `[E, ...]` buffer (autograd over `w[e]` would allocate a full
`[E, ...]` gradient per expert) and the Python overhead per expert is a few calls. It needs the
per-expert counts on the host (one sync per layer), which costs nothing on a CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def swiglu_forward(x: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """One expert's `(silu(x Wg) ⊙ x Wu) Wd` with `w_gate_up = [Wg | Wu]` (one GEMM for both), under
    plain autograd: what the loop computes for that expert's rows (the expert-parallel layer's FFN)."""
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down


def gelu_forward(x: Tensor, w1: Tensor, w2: Tensor, b1: Optional[Tensor], b2: Optional[Tensor]) -> Tensor:
    """One expert's `gelu(x W1 + b1) W2 + b2`, under plain autograd (as `swiglu_forward`)."""
    pre = x @ w1 if b1 is None else torch.addmm(b1, x, w1)
    act = F.gelu(pre)
    return act @ w2 if b2 is None else torch.addmm(b2, act, w2)


def _spans(counts: list[int]) -> list[tuple[int, slice]]:
    """`(expert, its rows)` of the experts that got any of the slots sorted by expert."""
    spans, start = [], 0
    for e, n in enumerate(counts):
        if n:
            spans.append((e, slice(start, start + n)))
        start += n
    return spans


def _mm(a: Tensor, w: Tensor, b: Optional[Tensor], out: Tensor) -> None:
    if b is None:
        torch.mm(a, w, out=out)
    else:
        torch.addmm(b, a, w, out=out)


class _Scratch:
    """Per-expert working rows, carved from buffers of a power-of-two number of rows, at least the
    busiest expert's: a handful of sizes over a run instead of one per routing decision."""

    def __init__(self, like: Tensor, counts: list[int]) -> None:
        self.like, self.rows = like, 1 << max(max(counts) - 1, 0).bit_length()
        self.buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, n: int, width: int) -> Tensor:
        if name not in self.buffers:
            self.buffers[name] = self.like.new_empty(self.rows, width)
        return self.buffers[name][:n]


class _ExpertLoop(torch.autograd.Function):
    """`y_TH[t] = Σ_slots weight_S · FFN_e(x_TH[t])` over the kept slots, expert by expert.

    Slots are sorted by expert (`token_S`, `weight_S`, `counts` per expert); dropped slots are
    past `sum(counts)` and never touched. `params` are the stacked `[E, ...]` expert tensors in the
    order the activation's forward takes them (None for an absent bias).

    Each expert's chain (gather, GEMM, activation, GEMM, weighted add) runs on its own rows while
    they are in cache, but nothing is allocated at its size: what the backward keeps is written
    into `[K, ...]` tensors (K = tokens × top-k less drops, the same every step) and the rest into
    `_Scratch` rows. Tensors sized by each routing decision left holes that glibc's heap kept, so
    the resident set climbed step after step (README, Reliability 11).
    """

    @staticmethod
    def forward(ctx, activation, counts, x_TH, token_S, weight_S, *params):  # type: ignore[override]
        spans = _spans(counts)
        kept = sum(counts)
        scratch = _Scratch(x_TH, counts)
        h, i = x_TH.shape[1], params[1].shape[1]  # w_down / w2: [E, I, H]
        y_KH = x_TH.new_empty(kept, h)
        inner_KI = x_TH.new_empty(kept, 2 * i if activation == "swiglu" else i)  # gate|up, or pre-GELU
        y_TH = torch.zeros_like(x_TH)
        for e, rows in spans:
            n, tokens = rows.stop - rows.start, token_S[rows]
            x = torch.index_select(x_TH, 0, tokens, out=scratch("x", n, h))
            act = scratch("act", n, i)
            if activation == "swiglu":
                w_gate_up, w_down = params
                _mm(x, w_gate_up[e], None, inner_KI[rows])
                gate, up = inner_KI[rows].chunk(2, dim=-1)
                torch.ops.aten.silu.out(gate, out=act).mul_(up)
                _mm(act, w_down[e], None, y_KH[rows])
            else:
                w1, w2, b1, b2 = params
                _mm(x, w1[e], None if b1 is None else b1[e], inner_KI[rows])
                torch.ops.aten.gelu.out(inner_KI[rows], out=act)
                _mm(act, w2[e], None if b2 is None else b2[e], y_KH[rows])
            y_TH.index_add_(0, tokens, torch.mul(y_KH[rows], weight_S[rows, None].to(x.dtype), out=x))
        ctx.activation, ctx.counts, ctx.num_params = activation, counts, len(params)
        # everything through save_for_backward (None for an absent bias), so activation
        # checkpointing's saved-tensor hooks also drop and recompute the expert activations
        ctx.save_for_backward(x_TH, token_S, weight_S, *params, y_KH, inner_KI)
        return y_TH

    @staticmethod
    def backward(ctx, grad_TH):  # type: ignore[override]
        x_TH, token_S, weight_S, *rest = ctx.saved_tensors
        params, (y_KH, inner_KI) = rest[:ctx.num_params], rest[ctx.num_params:]
        swiglu = ctx.activation == "swiglu"
        scratch = _Scratch(x_TH, ctx.counts)
        h, i = x_TH.shape[1], params[1].shape[1]
        grad_TH = grad_TH.contiguous()
        grad_x = torch.zeros_like(x_TH)
        grad_weight_K = y_KH.new_empty(y_KH.shape[0])
        grad_params = [None if p is None else torch.zeros_like(p) for p in params]
        for e, rows in _spans(ctx.counts):
            n, tokens = rows.stop - rows.start, token_S[rows]
            grad_y = torch.index_select(grad_TH, 0, tokens, out=scratch("grad_y", n, h))
            x = scratch("x", n, h)
            # multiply-then-sum: autograd's reduction order, so router gradients match the reference
            torch.sum(torch.mul(y_KH[rows], grad_y, out=x), dim=-1, out=grad_weight_K[rows])
            grad_y.mul_(weight_S[rows, None].to(grad_y.dtype))
            act, grad_act = scratch("act", n, i), scratch("grad_act", n, i)
            if swiglu:
                w_gate_up, w_down = params
                grad_w_gate_up, grad_w_down = grad_params
                gate, up = inner_KI[rows].chunk(2, dim=-1)
                sig = torch.sigmoid(gate, out=scratch("sig", n, i))
                silu = torch.mul(gate, sig, out=scratch("silu", n, i))
                torch.mm(torch.mul(silu, up, out=act).t(), grad_y, out=grad_w_down[e])
                torch.mm(grad_y, w_down[e].t(), out=grad_act)
                # the gate and up gradients side by side in one [n, 2I] block: x's and w_gate_up's
                # gradients are then one GEMM each against the fused weight
                grad_inner = scratch("grad_gate_up", n, 2 * i)
                grad_gate, grad_up = grad_inner.chunk(2, dim=-1)
                torch.mul(grad_act, silu, out=grad_up)
                slope = torch.neg(sig, out=silu).add_(1.0).mul_(gate).add_(1.0).mul_(sig)  # silu is spent
                torch.mul(grad_act, up, out=grad_gate).mul_(slope)
                w_in, grad_w_in = w_gate_up[e], grad_w_gate_up[e]
            else:
                w1, w2 = params[:2]
                grad_w1, grad_w2, grad_b1, grad_b2 = grad_params
                pre = inner_KI[rows]
                torch.mm(torch.ops.aten.gelu.out(pre, out=act).t(), grad_y, out=grad_w2[e])
                torch.mm(grad_y, w2[e].t(), out=grad_act)
                grad_inner = torch.ops.aten.gelu_backward.grad_input(grad_act, pre, grad_input=act)
                if grad_b1 is not None:
                    torch.sum(grad_inner, dim=0, out=grad_b1[e])
                if grad_b2 is not None:
                    torch.sum(grad_y, dim=0, out=grad_b2[e])
                w_in, grad_w_in = w1[e], grad_w1[e]
            torch.index_select(x_TH, 0, tokens, out=x)
            torch.mm(x.t(), grad_inner, out=grad_w_in)
            grad_x.index_add_(0, tokens, torch.mm(grad_inner, w_in.t(), out=x))
        grad_weight_S = torch.zeros_like(weight_S)
        grad_weight_S[:grad_weight_K.shape[0]] = grad_weight_K.to(weight_S.dtype)
        return (None, None, grad_x, None, grad_weight_S, *grad_params)


def expert_loop(x_TH: Tensor, token_S: Tensor, weight_S: Tensor, counts: list[int], activation: str,
                params: tuple[Optional[Tensor], ...]) -> Tensor:
    """Kept slots sorted by expert (`counts[e]` for expert e, dropped slots after them) through
    their experts, weighted and summed per token."""
    return _ExpertLoop.apply(activation, counts, x_TH, token_S, weight_S, *params)
