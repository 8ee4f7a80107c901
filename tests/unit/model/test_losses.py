"""Pure MoE loss and utilisation functions against their closed forms."""

import math

import torch

from ava.model.losses import entropy, gini, load_balancing_loss, router_z_loss


def test_load_balancing_loss_is_one_for_uniform_routing():
    num_tokens, num_experts, top_k = 64, 8, 2
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    # every expert chosen equally often: token t picks experts (t, t+1) mod E
    expert = torch.stack([torch.arange(num_tokens) % num_experts,
                          (torch.arange(num_tokens) + 1) % num_experts], dim=1)
    assert load_balancing_loss(probs_TE=probs, expert_TK=expert).item() == 1.0
    assert expert.shape[1] == top_k


def test_load_balancing_loss_grows_when_router_collapses():
    num_tokens, num_experts = 64, 8
    probs = torch.full((num_tokens, num_experts), 0.01 / (num_experts - 1))
    probs[:, 0] = 0.99
    expert = torch.zeros(num_tokens, 1, dtype=torch.long)
    loss = load_balancing_loss(probs_TE=probs, expert_TK=expert).item()
    assert math.isclose(loss, num_experts * 0.99, rel_tol=1e-6)
    assert loss > 7.0


def test_z_loss_matches_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = (math.log(math.exp(1) + math.exp(2) + math.exp(3)) ** 2 + math.log(3.0) ** 2) / 2
    assert math.isclose(router_z_loss(logits_TE=logits).item(), expected, rel_tol=1e-6)


def test_gini_and_entropy_exact_values():
    uniform = torch.full((8,), 5.0)
    one_hot = torch.tensor([0.0, 0, 0, 40, 0, 0, 0, 0])
    assert abs(gini(uniform).item()) < 1e-7
    assert math.isclose(gini(one_hot).item(), 7 / 8, rel_tol=1e-6)
    assert math.isclose(entropy(uniform).item(), math.log(8), rel_tol=1e-6)
    assert entropy(one_hot).item() == 0.0
