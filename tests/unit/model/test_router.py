"""Router choice functions: renormalised top-k, Sinkhorn balancing, jitter only in training."""

import torch

from ava.config import model_preset
from ava.model import AvaForCausalLM
from ava.model.losses import gini, routed_counts
from ava.model.router import Router, choose_experts


def test_topk_weights_are_renormalised_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs, expert, weight = choose_experts(logits, top_k=2, routing="topk", sinkhorn_iters=0, training=True)
    assert expert.tolist() == [[0, 1]]
    p = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(weight[0], torch.stack([p[0], p[1]]) / (p[0] + p[1]))
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))


def test_sinkhorn_spreads_a_skewed_router_in_training_only():
    torch.manual_seed(0)
    logits = torch.randn(256, 8) + torch.linspace(3.0, 0.0, 8)
    kw = dict(top_k=1, routing="sinkhorn", sinkhorn_iters=8)
    _, balanced, _ = choose_experts(logits, training=True, **kw)
    _, plain, _ = choose_experts(logits, training=False, **kw)
    g_bal, g_plain = gini(routed_counts(balanced, 8)), gini(routed_counts(plain, 8))
    assert g_bal < 0.1 < g_plain


def test_jitter_applies_in_training_only():
    torch.manual_seed(0)
    router = Router(model_preset("nano", router_jitter=0.1))
    x = torch.randn(16, 64)
    assert torch.equal(router.eval()(x), router.eval()(x))
    assert not torch.equal(router.train()(x), router.train()(x))


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 16))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        model = AvaForCausalLM(model_preset("nano", activation_checkpointing=ckpt)).train()
        torch.manual_seed(2)  # same jitter noise in both runs
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
