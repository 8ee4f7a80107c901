"""The MoE layer: route, apply capacity, dispatch by sorting, grouped matmul, combine."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ava.config import ModelConfig
from ava.model.capacity import Assignment, apply_capacity, capacity_for
from ava.model.expert_loop import expert_loop
from ava.model.experts import DenseFFN, Experts, resolve_backend
from ava.model.precision import autocast_dtype
from ava.model.router import Router, router_choice
from ava.model.routing_stats import RouterStats, RoutingCollector, router_stats


class _Dispatch(torch.autograd.Function):
    """`x_SH = x_TH[token of sorted slot S]`; the backward sums each token's K slot gradients by a
    gather and a reshape-sum (parallel and deterministic, no scatter-add)."""

    @staticmethod
    def forward(ctx, x_TH, order_S, pos_A, kept_A):  # type: ignore[override]
        top_k = order_S.numel() // x_TH.shape[0]
        ctx.top_k = top_k
        ctx.save_for_backward(pos_A, kept_A)
        return x_TH.index_select(0, order_S // top_k)

    @staticmethod
    def backward(ctx, grad_SH):  # type: ignore[override]
        pos_A, kept_A = ctx.saved_tensors
        grad_AH = grad_SH.index_select(0, pos_A)
        if kept_A.numel():  # rows past the last kept slot hold no gradient (uninitialised memory)
            grad_AH = grad_AH.masked_fill_(~kept_A[:, None], 0.0)
        num_tokens = pos_A.numel() // ctx.top_k
        return grad_AH.view(num_tokens, ctx.top_k, -1).sum(dim=1), None, None, None


class _Combine(torch.autograd.Function):
    """`y_TH[t] = Σ_k weight_TK[t, k] · y_SH[pos_A[t·K + k]]`: un-sort and weight in one batched
    matmul (the weighting is fused into the combine; the backward is gathers, no scatter-add)."""

    @staticmethod
    def forward(ctx, y_SH, weight_TK, order_S, pos_A, kept_A):  # type: ignore[override]
        num_tokens, top_k = weight_TK.shape
        y_AH = y_SH.index_select(0, pos_A)
        if kept_A.numel():  # expert outputs of dropped slots are not computed: zero them
            y_AH.masked_fill_(~kept_A[:, None], 0.0)
        y_TKH = y_AH.view(num_tokens, top_k, -1)
        w_T1K = weight_TK.to(y_SH.dtype).unsqueeze(1)
        ctx.save_for_backward(y_TKH, w_T1K, order_S)
        ctx.weight_dtype = weight_TK.dtype
        return torch.bmm(w_T1K, y_TKH).squeeze(1)

    @staticmethod
    def backward(ctx, grad_TH):  # type: ignore[override]
        y_TKH, w_T1K, order_S = ctx.saved_tensors
        grad_TH = grad_TH.contiguous()
        # multiply-then-sum (not bmm): the same reduction order as autograd's, so the router's
        # gradient matches the per-expert reference loop to fp32 rounding
        grad_w_TK = (y_TKH * grad_TH.unsqueeze(1)).sum(dim=-1).to(ctx.weight_dtype)
        grad_y_TKH = w_T1K.transpose(1, 2) * grad_TH.unsqueeze(1)
        grad_y_SH = grad_y_TKH.view(-1, grad_TH.shape[-1]).index_select(0, order_S)
        return grad_y_SH, grad_w_TK, None, None, None


def slot_order(assignment: Assignment, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_A, order_S): each of the T·K slots' sort key (its expert, or E for a dropped slot, so
    dropped slots sort after every kept one) and the slots in stable order of that key."""
    expert_A = assignment.expert_TK.reshape(-1)
    key_A = expert_A if assignment.all_kept else torch.where(assignment.kept_TK.reshape(-1), expert_A, num_experts)
    return key_A, torch.argsort(key_A, stable=True)


# Not traced by torch.compile: the loop backend hands the per-expert counts to Python as ints,
# so a traced loop is specialised on each routing decision (a recompilation nearly every step,
# until dynamo's recompile limit sends it back to eager); and `torch._grouped_mm`'s shape
# function admits bf16 only, so the grouped path cannot be traced in fp32. A compiled region
# around this (a block, a whole model) stops here and runs it eagerly.
@torch.compiler.disable
def dispatch_combine(x_TH: torch.Tensor, assignment: Assignment, experts: Experts) -> torch.Tensor:
    """Sort the T·K (token, expert) slots by expert, run each expert on its rows, and weight +
    sum them back per token (`model.expert_backend`: one grouped matmul per projection, or the
    per-expert loop).

    Dropped slots sort after every kept slot (key E) and are never computed. The grouped path's
    shapes never depend on routing (no host sync); its dropped rows are masked out both ways.
    """
    dtype = autocast_dtype(x_TH.device.type)
    if dtype is not None:  # autocast does not see inside the custom autograd nodes: cast once, here
        with torch.autocast(x_TH.device.type, enabled=False):
            return dispatch_combine(x_TH.to(dtype), assignment, experts)
    num_experts = experts.num_experts
    key_A, order_S = slot_order(assignment, num_experts)
    weight_TK = assignment.weight_TK
    if assignment.all_kept:
        kept_A = key_A.new_empty(0, dtype=torch.bool)
    else:
        kept_A = assignment.kept_TK.reshape(-1)
        weight_TK = weight_TK.masked_fill(~assignment.kept_TK, 0.0)
    counts_E = torch.bincount(key_A, minlength=num_experts + 1)[:num_experts]
    top_k = weight_TK.shape[1]
    # w_down or w2 `[E, I, H]`: both I and H are checked for alignment
    backend = resolve_backend(experts.backend, x_TH, experts.stacked()[1],
                              rows_per_expert=key_A.numel() / num_experts, loop_min_rows=experts.loop_min_rows)
    if backend == "loop":
        return expert_loop(x_TH, order_S // top_k, weight_TK.reshape(-1)[order_S], counts_E.tolist(),
                           experts.activation, experts.stacked(x_TH.dtype))
    pos_A = torch.empty_like(order_S)
    pos_A[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    expert_S = key_A[order_S]  # E marks a dropped slot
    x_SH = _Dispatch.apply(x_TH, order_S, pos_A, kept_A)
    y_SH = experts(x_SH, expert_S, counts_E)
    return _Combine.apply(y_SH, weight_TK, order_S, pos_A, kept_A)


def route(router: Router, cfg: ModelConfig, x_TH: torch.Tensor, training: bool,
          seq_len: Optional[int] = None) -> tuple[Assignment, RouterStats]:
    """Router → top-k (or Sinkhorn) choice → capacity: the routing decision and its stats
    (`seq_len`: the tokens of one sequence, for the sequence-wise balance loss).

    Every decision is local to this rank's tokens, so an expert-parallel layer that calls this
    makes the same decisions as the data-parallel one."""
    logits_TE = router(x_TH)
    probs_TE, expert_TK, weight_TK = router_choice(cfg, logits_TE, training, router.balance_bias)
    factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
    capacity = capacity_for(x_TH.shape[0], cfg.num_experts, factor)
    assignment = apply_capacity(expert_TK, weight_TK, probs_TE, capacity, cfg.overflow)
    stats = router_stats(logits_TE, probs_TE, expert_TK, assignment.dropped_fraction, cfg.num_experts,
                         seq_len if cfg.aux_loss_scope == "sequence" else None)
    return assignment, stats


def add_residual(y_TH: torch.Tensor, x_TH: torch.Tensor, assignment: Assignment,
                 residual: Optional[nn.Module]) -> torch.Tensor:
    """The `residual` overflow policy: tokens no expert kept go through the dense FFN."""
    if residual is None:
        return y_TH
    rows = assignment.unserved_T.nonzero().squeeze(-1)
    return y_TH.index_add(0, rows, residual(x_TH[rows]))


class SharedExperts(nn.Module):
    """`shared_experts` FFNs every token passes through, as one FFN of their summed width, with
    Qwen2-MoE's optional per-token sigmoid gate. Dense parameters: data-parallel under expert
    parallelism."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ffn = DenseFFN(cfg, cfg.shared_experts * (cfg.shared_ffn_size or cfg.ffn_size))
        self.gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        y_TH = self.ffn(x_TH)
        return y_TH if self.gate is None else torch.sigmoid(self.gate(x_TH)) * y_TH


def add_shared(y_TH: torch.Tensor, x_TH: torch.Tensor, shared: Optional[SharedExperts]) -> torch.Tensor:
    return y_TH if shared is None else y_TH + shared(x_TH)


class MoELayer(nn.Module):
    """Route, run the experts, combine, add the shared experts. Returns the output tensor alone;
    its routing statistics and balance losses go to the model's `RoutingCollector` under this
    layer's index."""

    def __init__(self, cfg: ModelConfig, layer_index: int = 0, collector: Optional[RoutingCollector] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_index = layer_index
        self.collector = collector if collector is not None else RoutingCollector()  # standalone: its own
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.residual = DenseFFN(cfg) if cfg.overflow == "residual" else None
        self.shared = SharedExperts(cfg) if cfg.shared_experts else None

    # Not traced by torch.compile: a trace would be guarded on this layer's index and on the
    # collector's contents, which differ from layer to layer (a recompilation per layer, past
    # dynamo's limit of 8 in deeper models), so the one compiled block would not serve them all.
    @torch.compiler.disable
    def report(self, stats: RouterStats) -> None:
        self.collector.record(self.layer_index, stats)

    def forward(self, x_BLH: torch.Tensor) -> torch.Tensor:
        x_TH = x_BLH.reshape(-1, x_BLH.shape[-1])
        assignment, stats = route(self.router, self.cfg, x_TH, self.training, x_BLH.shape[-2])
        self.report(stats)
        y_TH = dispatch_combine(x_TH, assignment, self.experts)
        y_TH = add_residual(y_TH, x_TH, assignment, self.residual)
        return add_shared(y_TH, x_TH, self.shared).view_as(x_BLH)
