"""Capacity accounting and the three overflow policies."""

import torch

from ava.config import model_preset
from ava.model.capacity import apply_capacity, capacity_for
from ava.model.moe import MoELayer, route
from ava.model.router import choose_experts


def _routing(num_tokens=64, num_experts=4, top_k=2, seed=0):
    torch.manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts) + torch.tensor([2.0, 0.5, 0.0, -1.0])  # skewed
    return choose_experts(logits, top_k=top_k, routing="topk", sinkhorn_iters=0, training=True)


def test_dropped_fraction_counts_over_capacity_assignments():
    probs, expert, weight = _routing()
    capacity = capacity_for(64, 4, 0.5)
    assert capacity == 8
    assignment = apply_capacity(expert, weight, probs, capacity, "drop")
    routed = torch.bincount(expert.flatten(), minlength=4)
    over = (routed - capacity).clamp_min(0).sum().item()
    assert over > 0
    assert round(assignment.dropped_fraction.item() * expert.numel()) == over
    kept_per_expert = torch.bincount(expert[assignment.kept_TK], minlength=4)
    assert torch.equal(kept_per_expert, routed.clamp_max(capacity))


def test_winners_are_highest_probability_then_earliest():
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1], [0.6, 0.4]])
    expert = torch.zeros(4, 1, dtype=torch.long)
    weight = torch.ones(4, 1)
    kept = apply_capacity(expert, weight, probs, 2, "drop").kept_TK.flatten().tolist()
    assert kept == [True, False, True, False]  # token 2 (0.9) first, then token 0 (earliest 0.6)


def test_next_best_drops_fewer_than_drop_and_respects_capacity():
    probs, expert, weight = _routing()
    capacity = capacity_for(64, 4, 0.6)
    dropped = apply_capacity(expert, weight, probs, capacity, "drop")
    rerouted = apply_capacity(expert, weight, probs, capacity, "next_best")
    assert rerouted.dropped_fraction < dropped.dropped_fraction
    load = torch.bincount(rerouted.expert_TK[rerouted.kept_TK], minlength=4)
    assert int(load.max()) <= capacity
    # a token never sends two slots to the same expert
    kept_pairs = rerouted.expert_TK.masked_fill(~rerouted.kept_TK, -1)
    assert (kept_pairs[:, 0] != kept_pairs[:, 1]).logical_or(kept_pairs[:, 0] < 0).all()


def test_residual_differs_from_drop_only_on_unserved_tokens():
    torch.manual_seed(0)
    drop_cfg = model_preset("nano", capacity_factor=0.5, overflow="drop", router_jitter=0.0)
    res_cfg = model_preset("nano", capacity_factor=0.5, overflow="residual", router_jitter=0.0)
    drop_layer, res_layer = MoELayer(drop_cfg).train(), MoELayer(res_cfg).train()
    res_layer.load_state_dict(drop_layer.state_dict(), strict=False)
    x = torch.randn(2, 32, drop_cfg.hidden_size)
    y_drop = drop_layer(x)
    y_res = res_layer(x)
    assignment, _ = route(res_layer.router, res_cfg, x.reshape(-1, drop_cfg.hidden_size), training=True)
    unserved = assignment.unserved_T
    assert unserved.any() and not unserved.all()
    differs = (y_drop.reshape(64, -1) - y_res.reshape(64, -1)).abs().amax(dim=-1) > 0
    assert torch.equal(differs, unserved)


def test_evaluation_is_dropless_by_default():
    torch.manual_seed(0)
    layer = MoELayer(model_preset("nano", capacity_factor=0.25)).eval()
    layer(torch.randn(1, 64, 64))
    (stats,) = layer.collector.take([0])
    assert stats.dropped_fraction.item() == 0.0
