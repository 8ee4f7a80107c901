"""Causality and RoPE's relative-position property."""

import torch

from ava.config import model_preset
from ava.model import AvaForCausalLM
from ava.model.rope import apply_rope, rope_tables


def test_changing_a_later_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = AvaForCausalLM(model_preset("nano")).eval()
    ids = torch.randint(0, 512, (2, 24))
    base = model(ids).logits
    for t in (0, 5, 22):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % 512
        out = model(changed).logits
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
        assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4


def test_causality_holds_in_training_when_dropless():
    torch.manual_seed(0)
    model = AvaForCausalLM(model_preset("nano", capacity_factor=None, router_jitter=0.0)).train()
    ids = torch.randint(0, 512, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 512
    torch.testing.assert_close(model(changed).logits[:, :10], model(ids).logits[:, :10])


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim, shift = 16, 11
    cos, sin = rope_tables(head_dim, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)

    def score(pq: int, pk: int) -> torch.Tensor:
        rq = apply_rope(q, cos[pq][None, None], sin[pq][None, None])
        rk = apply_rope(k, cos[pk][None, None], sin[pk][None, None])
        return (rq * rk).sum()

    for pq, pk in ((5, 2), (9, 9), (20, 3)):
        torch.testing.assert_close(score(pq, pk), score(pq + shift, pk + shift), atol=1e-5, rtol=1e-5)
    assert (score(5, 2) - score(5, 4)).abs() > 1e-3


def test_left_padding_and_kv_cache_match_full_forward():
    torch.manual_seed(0)
    model = AvaForCausalLM(model_preset("nano")).eval()
    ids = torch.randint(0, 512, (1, 12))
    full = model(ids).logits
    # cached: prefix then one token at a time
    out = model(ids[:, :8], use_cache=True)
    steps = [out.logits]
    for t in range(8, 12):
        out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # left-padded copy of the same sequence gives the same logits at real positions
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], full, atol=1e-5, rtol=1e-5)
