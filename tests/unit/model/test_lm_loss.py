"""The chunked LM-head loss is the unfused head's cross-entropy, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ava.config import IGNORE_INDEX, model_preset
from ava.model.lm_loss import linear_cross_entropy
from ava.model.transformer import AvaForCausalLM


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_equal_the_full_logits(chunk_rows):
    torch.manual_seed(0)
    x = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    labels = torch.randint(0, 97, (50,))
    labels[::3] = IGNORE_INDEX  # ignored rows: no loss, no gradient
    ref = F.cross_entropy(x @ w.t(), labels, ignore_index=IGNORE_INDEX)
    gx, gw = torch.autograd.grad(2.5 * ref, (x, w))
    loss = linear_cross_entropy(x, w, labels, chunk_rows)
    fx, fw = torch.autograd.grad(2.5 * loss, (x, w))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fx, gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-7)
    assert fx[::3].abs().max() == 0


def test_no_target_rows_give_loss_zero_not_nan():
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(x, w, torch.full((4,), IGNORE_INDEX), 2)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max() == 0 and w.grad.abs().max() == 0


@pytest.mark.parametrize("tied", [True, False])
def test_model_trains_without_logits_and_matches_the_unfused_step(tied):
    """Training with labels builds no logits; loss and every gradient equal the unfused head's
    (model.loss_chunk_rows=null), tied or untied (the untied head is the module ZeRO-3 hooks)."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    runs = {}
    for chunk in (None, 5):
        torch.manual_seed(0)
        model = AvaForCausalLM(model_preset("nano", vocab_size=128, tie_embeddings=tied, router_jitter=0.0,
                                            loss_chunk_rows=chunk)).train()
        out = model(ids, labels=ids)
        out.loss.backward()
        runs[chunk] = (out, {n: p.grad for n, p in model.named_parameters()})
    (full, full_grads), (chunked, chunked_grads) = runs[None], runs[5]
    assert chunked.logits is None and full.logits is not None
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-6, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.eval()
    with torch.no_grad():  # evaluation and inference keep their logits
        assert model(ids, labels=ids).logits.shape == (2, 24, 128)
