"""`model.expert_backend`: what `auto` picks, the backends agree when experts get no rows, and the
loop's allocations do not follow the routing."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ava.config import model_preset
from ava.model.expert_loop import expert_loop
from ava.model.experts import resolve_backend
from ava.model.moe import MoELayer


def test_auto_picks_the_loop_on_cpu_only_for_enough_rows_per_expert():
    x, w = torch.zeros(4, 64), torch.zeros(8, 64, 128)
    assert resolve_backend("auto", x, w, rows_per_expert=256, loop_min_rows=256) == "loop"
    assert resolve_backend("auto", x, w, rows_per_expert=255.5, loop_min_rows=256) == "grouped_mm"
    # bf16 rows that are not 16-byte aligned cannot run the grouped kernel: the loop, whatever the size
    xb, wb = x.bfloat16(), torch.zeros(8, 64, 100, dtype=torch.bfloat16)
    assert resolve_backend("auto", xb, wb, rows_per_expert=1, loop_min_rows=256) == "loop"
    assert resolve_backend("grouped_mm", x, w, rows_per_expert=1e6, loop_min_rows=256) == "grouped_mm"


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_backends_agree_and_idle_experts_get_zero_gradients(activation):
    torch.manual_seed(0)
    grads, outs = {}, {}
    for backend in ("loop", "grouped_mm"):
        torch.manual_seed(0)
        cfg = model_preset("nano", activation=activation, bias=activation == "gelu", router_jitter=0.0,
                           capacity_factor=None, expert_backend=backend)
        layer = MoELayer(cfg).train()
        with torch.no_grad():  # every token prefers experts 0 and 1: the others get no rows
            for p in layer.parameters():
                p.normal_(0.0, 0.2)
            layer.router.gate.weight.zero_()
            layer.router.gate.weight[0, 0] = layer.router.gate.weight[1, 0] = 5.0
        x = torch.randn(32, cfg.hidden_size)
        x[:, 0] = x[:, 0].abs() + 1.0
        x.requires_grad_()
        y = layer(x)
        (stats,) = layer.collector.take([0])
        y.square().sum().backward()
        assert stats.tokens_per_expert[2:].sum() == 0
        outs[backend] = (y.detach(), x.grad)
        grads[backend] = {n: p.grad for n, p in layer.experts.named_parameters()}
        for name, g in grads[backend].items():
            assert torch.isfinite(g).all()
            assert g[2:].abs().max() == 0, f"{backend}: idle experts' {name} gradient must be zero"
            assert g[:2].abs().max() > 0
    torch.testing.assert_close(outs["loop"], outs["grouped_mm"], atol=1e-5, rtol=1e-5)
    for name in grads["loop"]:
        torch.testing.assert_close(grads["loop"][name], grads["grouped_mm"][name], atol=1e-5, rtol=1e-5, msg=name)


def _train_losses(cfg, ids, steps: int, autocast: bool, dtype: torch.dtype = torch.float32) -> list[float]:
    """Losses of `steps` AdamW steps from seed 0 (fp32 masters; `dtype` the module's own dtype)."""
    from ava.model.transformer import AvaForCausalLM

    torch.manual_seed(0)
    model = AvaForCausalLM(cfg).to(dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is None or (p.grad.dtype == p.dtype and torch.isfinite(p.grad).all())
                   for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "auto"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_every_backend_trains_in_bf16(backend, activation):
    """Under `torch.autocast(bf16)` (transformers' Trainer, user loops) and with the module itself
    in bf16 (DeepSpeed's bf16 engine), each backend trains, and its losses follow fp32's within
    bf16 rounding (the loop backend once crashed in index_add_ under autocast: fp32 output, bf16 rows)."""
    cfg = model_preset("nano", activation=activation, bias=activation == "gelu", router_jitter=0.0,
                       capacity_factor=None, expert_backend=backend)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    reference = _train_losses(cfg, ids, 3, autocast=False)
    for losses in (_train_losses(cfg, ids, 3, autocast=True), _train_losses(cfg, ids, 3, False, torch.bfloat16)):
        assert losses == pytest.approx(reference, rel=2e-2)
        assert losses != reference  # bf16 really ran: fp32 would agree to the last bit


class _Allocations(TorchDispatchMode):
    """The byte size of every tensor an op allocates (outputs that alias no input)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.sizes += [t.untyped_storage().nbytes() for t in tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_the_loop_allocates_nothing_shaped_by_the_routing(activation):
    """Two routings of the same tokens (busiest expert 7 and 8 rows: one scratch size) allocate the
    same tensors: buffers sized per expert left heap holes that raised the main job's RSS each step."""
    t, h, i, k, e = 8, 16, 24, 2, 4

    def allocations(counts: list[int]) -> list[int]:
        torch.manual_seed(0)
        x = torch.randn(t, h, requires_grad=True)
        weight = torch.rand(t * k, requires_grad=True)
        shapes = [(e, h, 2 * i), (e, i, h)] if activation == "swiglu" else [(e, h, i), (e, i, h), (e, i), (e, h)]
        params = tuple(torch.randn(*s, requires_grad=True) for s in shapes)
        with _Allocations() as mode:
            y = expert_loop(x, torch.randperm(t * k) // k, weight, counts, activation, params)
            y.backward(torch.ones(t, h))
        return sorted(mode.sizes)

    first = allocations([5, 3, 7, 1])
    assert first and first == allocations([2, 8, 4, 2])
