"""Sort-based dispatch equals a plain per-expert reference loop (fp32, 1e-5), outputs and grads.

The reference re-implements routing, capacity and overflow with Python loops over tokens and
experts, so it checks the vectorised capacity logic as well as the grouped matmul.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ava.config import model_preset
from ava.model.moe import MoELayer

TOL = 1e-5


def reference_assignment(probs: torch.Tensor, top_k: int, capacity, overflow: str):
    """Returns {(token, slot): (expert, weight)} of kept slots, by plain loops."""
    num_tokens, num_experts = probs.shape
    chosen = probs.topk(top_k, dim=-1).indices.tolist()
    weights = {}
    for t in range(num_tokens):
        w = [probs[t, e].item() for e in chosen[t]]
        for k, e in enumerate(chosen[t]):
            weights[(t, k)] = (e, w[k] / sum(w))
    if capacity is None:
        return weights
    kept, load = {}, [0] * num_experts
    for e in range(num_experts):
        cands = [(t, k) for (t, k), (ee, _) in weights.items() if ee == e]
        cands.sort(key=lambda tk: (-probs[tk[0], e].item(), tk[0]))
        for tk in cands[:capacity]:
            kept[tk] = weights[tk]
        load[e] = min(len(cands), capacity)
    if overflow != "next_best":
        return kept
    order = probs.argsort(dim=-1, descending=True, stable=True).tolist()
    remaining = {t: [e for e in order[t] if e not in chosen[t]] for t in range(num_tokens)}
    for r in range(num_experts - top_k):
        offers = {}
        for t in range(num_tokens):
            pending = [k for k in range(top_k) if (t, k) not in kept]
            if pending:
                offers.setdefault(remaining[t][r], []).append((t, pending[0]))
        for e, tks in offers.items():
            tks.sort(key=lambda tk: (-probs[tk[0], e].item(), tk[0]))
            for t, k in tks:
                if load[e] < capacity:
                    kept[(t, k)] = (e, weights[(t, k)][1])
                    load[e] += 1
    return kept


def expert_ffn(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    if ex.activation == "swiglu":
        i = ex.w_down.shape[1]
        return (F.silu(x @ ex.w_gate_up[e, :, :i]) * (x @ ex.w_gate_up[e, :, i:])) @ ex.w_down[e]
    return F.gelu(x @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]


def reference_forward(layer: MoELayer, x_TH: torch.Tensor) -> torch.Tensor:
    cfg = layer.cfg
    probs = torch.softmax(layer.router.gate(x_TH), dim=-1)
    factor = cfg.capacity_factor if layer.training else cfg.eval_capacity_factor
    capacity = None if factor is None else int(x_TH.shape[0] / cfg.num_experts * factor)
    kept = reference_assignment(probs.detach(), cfg.top_k, capacity, cfg.overflow)
    chosen = probs.topk(cfg.top_k, dim=-1).indices
    weight = probs.gather(1, chosen) / probs.gather(1, chosen).sum(-1, keepdim=True)  # slot weights
    out = torch.zeros_like(x_TH)
    for e in range(cfg.num_experts):  # the per-expert loop of the architecture document
        slots = [tk for tk, (ee, _) in kept.items() if ee == e]
        if not slots:
            continue
        idx = torch.tensor([t for t, _ in slots])
        w = torch.stack([weight[t, k] for t, k in slots])
        out = out.index_add(0, idx, w[:, None] * expert_ffn(layer, e, x_TH[idx]))
    if cfg.overflow == "residual" and capacity is not None:
        served = {t for (t, _) in kept}
        rows = [t for t in range(x_TH.shape[0]) if t not in served]
        if rows:
            idx = torch.tensor(rows)
            out = out.index_add(0, idx, layer.residual(x_TH[idx]))
    return out


CASES = [
    (top_k, factor, overflow, activation, backend)
    for top_k in (1, 2)
    for factor, overflow in ((None, "drop"), (0.75, "drop"), (0.75, "next_best"), (0.75, "residual"))
    for activation in ("gelu", "swiglu")
    for backend in ("grouped_mm", "loop")
]


@pytest.mark.parametrize(("top_k", "factor", "overflow", "activation", "backend"), CASES)
def test_dispatch_matches_reference_loop(top_k, factor, overflow, activation, backend):
    torch.manual_seed(0)
    cfg = model_preset(
        "nano", top_k=top_k, capacity_factor=factor, overflow=overflow, activation=activation,
        bias=activation == "gelu", router_jitter=0.0, expert_backend=backend,
    )
    layer = MoELayer(cfg).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(48, cfg.hidden_size)
    grad_out = torch.randn(48, cfg.hidden_size)

    x1 = x.clone().requires_grad_()
    y1 = layer(x1)
    (stats,) = layer.collector.take([0])
    (y1 * grad_out).sum().backward()
    grads1 = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()

    x2 = x.clone().requires_grad_()
    y2 = reference_forward(layer, x2)
    (y2 * grad_out).sum().backward()
    grads2 = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    if factor is not None:
        assert float(stats.dropped_fraction) > 0, "the case must exercise capacity"
    torch.testing.assert_close(y1, y2, atol=TOL, rtol=TOL)
    torch.testing.assert_close(x1.grad, x2.grad, atol=TOL, rtol=TOL)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        torch.testing.assert_close(grads1[name], grads2[name], atol=TOL, rtol=TOL, msg=name)
