"""Packed documents with `document_ids`: each document's logits and loss are what it gets alone,
and loss-weighted micro-batches give the global batch's per-target mean whatever the split."""

from __future__ import annotations

import torch

from ava.config import IGNORE_INDEX, model_preset
from ava.model.attention import document_positions
from ava.model.transformer import AvaForCausalLM
from ava.train.step import target_weights

LENGTHS = (7, 12, 5, 8)  # four documents packed in one row of 32


def model(chunk=None) -> AvaForCausalLM:
    torch.manual_seed(0)
    # dropless and no jitter: routing of a token cannot depend on its neighbours
    return AvaForCausalLM(model_preset("nano", vocab_size=97, router_jitter=0.0, capacity_factor=None,
                                       loss_chunk_rows=chunk))


def packed():
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 97, (n,), generator=gen) for n in LENGTHS]
    ids = torch.cat(docs)[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])[None]
    # targets: the second half of each document (an "assistant span"), never across documents
    labels = torch.full_like(ids, IGNORE_INDEX)
    start = 0
    for n in LENGTHS:
        labels[0, start + n // 2:start + n - 1] = ids[0, start + n // 2 + 1:start + n]
        start += n
    return docs, ids, document_ids, labels


def test_positions_restart_per_document():
    _, _, document_ids, _ = packed()
    assert document_positions(document_ids)[0].tolist() == [p for n in LENGTHS for p in range(n)]


def test_each_documents_logits_equal_its_logits_alone():
    net = model().eval()
    docs, ids, document_ids, _ = packed()
    with torch.no_grad():
        together = net(ids, document_ids=document_ids).logits[0]
        start = 0
        for doc in docs:
            alone = net(doc[None]).logits[0]
            torch.testing.assert_close(together[start:start + len(doc)], alone, rtol=1e-5, atol=1e-5)
            start += len(doc)
        mixed = net(ids).logits[0]  # without the mask the later documents see the earlier ones
    assert not torch.allclose(mixed[LENGTHS[0]:], together[LENGTHS[0]:], atol=1e-3)


def test_packed_masked_loss_equals_the_documents_losses_alone():
    """Mean over every target of the packed row == sum of each document's target losses computed
    unpacked / number of targets (training path: chunked head, gradients on)."""
    net = model(chunk=8).train()
    docs, ids, document_ids, labels = packed()
    loss = net(ids, labels=labels, document_ids=document_ids).lm_loss
    total, count, start = 0.0, 0, 0
    for doc in docs:
        doc_labels = labels[:, start:start + len(doc)]
        n = int((doc_labels != IGNORE_INDEX).sum())
        total += net(doc[None], labels=doc_labels).lm_loss * n
        count += n
        start += len(doc)
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-6)


def test_accumulation_1x4_equals_4x1_for_a_masked_batch():
    """One micro-batch of 4 rows, or 4 micro-batches of 1 row weighted by `target_weights` and
    averaged as DeepSpeed averages micro-batches: the same gradients, though rows hold different
    numbers of targets."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (4, 16), generator=gen)
    labels = ids.roll(-1, dims=1).clone()
    for row, keep in enumerate((15, 3, 9, 1)):  # targets per row differ
        labels[row, keep:] = IGNORE_INDEX
    grads = []
    for rows in ([slice(0, 4)], [slice(i, i + 1) for i in range(4)]):
        net = model(chunk=8).train()
        counts = torch.tensor([float((labels[r] != IGNORE_INDEX).sum()) for r in rows], dtype=torch.float64)
        weights = target_weights(counts, counts.sum(), world_size=1)
        for r, w in zip(rows, weights, strict=True):
            out = net(ids[r], labels=labels[r])
            (out.lm_loss * w.float() / len(rows)).backward()  # DeepSpeed divides by the accumulation
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_equal_micro_batches_have_weight_one():
    counts = torch.tensor([64.0, 64.0], dtype=torch.float64)
    assert target_weights(counts, counts.sum() * 2, world_size=2).tolist() == [1.0, 1.0]
