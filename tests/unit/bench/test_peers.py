"""The benchmark's peers compute the same function as Ava's MoE layer (fp32, identical weights and
routing), so `ava-bench moe` compares like with like. No timed assertions."""

from __future__ import annotations

import pytest
import torch

from ava.bench import peers
from ava.bench.moe_bench import MEAN_NORM, SKEW
from ava.bench.timing import _summarise, peak_memory

TOL = 1e-5


def _weights(e: int, h: int, i: int, skew: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = peers.MoEWeights.random(e, h, i, skew=skew, mean_norm=MEAN_NORM, generator=gen)
    x = peers.make_inputs(64, h, mean_norm=MEAN_NORM, generator=gen)
    grad = torch.randn(64, h, generator=gen)
    return w, x, grad


def _run(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    xi = x.clone().requires_grad_(True)
    y = module(xi)
    y.backward(grad)
    return y.detach(), xi.grad


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("routing", ["balanced", "skewed"])
def test_ava_naive_and_hf_mixtral_agree(top_k, routing):
    w, x, grad = _weights(8, 32, 48, SKEW if routing == "skewed" else 0.0)
    y_ava, g_ava = _run(peers.ava_layer(w, top_k), x, grad)
    for name, module in [
        ("naive", peers.NaiveMoE(w, top_k)),
        ("hf grouped_mm", peers.hf_mixtral_block(w, top_k, "grouped_mm")),
        ("hf eager", peers.hf_mixtral_block(w, top_k, "eager")),
        ("ava loop backend", peers.ava_layer(w, top_k, backend="loop")),
    ]:
        y, g = _run(module, x, grad)
        torch.testing.assert_close(y, y_ava, atol=TOL, rtol=TOL, msg=f"{name}: output")
        torch.testing.assert_close(g, g_ava, atol=TOL, rtol=TOL, msg=f"{name}: input gradient")


def test_router_and_expert_gradients_match_the_naive_loop():
    w, x, grad = _weights(8, 32, 48, SKEW)
    ava, naive = peers.ava_layer(w, 2), peers.NaiveMoE(w, 2)
    _run(ava, x, grad)
    _run(naive, x, grad)
    ex = ava.experts
    grad_gate, grad_up = ex.w_gate_up.grad.chunk(2, dim=-1)
    pairs = {"router": (ava.router.gate.weight.grad, naive.router.grad), "gate": (grad_gate, naive.gate.grad),
             "up": (grad_up, naive.up.grad), "down": (ex.w_down.grad, naive.down.grad)}
    for name, (a, b) in pairs.items():
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL, msg=name)


def test_skewed_routing_is_skewed_and_balanced_is_not():
    loads = {}
    for routing, skew in (("balanced", 0.0), ("skewed", SKEW)):
        gen = torch.Generator().manual_seed(0)
        w = peers.MoEWeights.random(8, 64, 16, skew=skew, mean_norm=MEAN_NORM, generator=gen)
        x = peers.make_inputs(4096, 64, mean_norm=MEAN_NORM, generator=gen)
        _, expert = peers.route(x, w.router_EH, 2)
        load = torch.bincount(expert.reshape(-1), minlength=8).float()
        loads[routing] = float(load.max() / load.mean())
    assert loads["skewed"] > 2.0 > loads["balanced"]


def test_dense_mlp_is_the_single_expert_layer():
    """With one expert and top-1 the MoE layer is exactly the dense MLP of the same weights."""
    w, x, grad = _weights(1, 32, 48, 0.0)
    y_ava, g_ava = _run(peers.ava_layer(w, 1), x, grad)
    y_dense, g_dense = _run(peers.DenseMLP(w, 1), x, grad)
    torch.testing.assert_close(y_dense, y_ava, atol=TOL, rtol=TOL)
    torch.testing.assert_close(g_dense, g_ava, atol=TOL, rtol=TOL)


def test_peak_memory_counts_saved_activations():
    lin = torch.nn.Linear(64, 256)
    x = torch.randn(128, 64, requires_grad=True)
    peak = peak_memory(lambda: torch.relu(lin(x)), torch.device("cpu"))
    assert peak >= 128 * 256 * 4  # the relu output (saved for backward) at least


def test_summary_statistics():
    t = _summarise([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.min_ms, t.max_ms, t.repeats) == (3.0, 1.0, 5.0, 5)
    assert t.iqr_ms > 0
