"""The nano model memorises a tiny fixed set, and every expert takes part in learning."""

import torch

from ava.config import model_preset
from ava.model import AvaForCausalLM


def test_nano_memorises_fixed_sequences_and_trains_every_expert():
    torch.manual_seed(0)
    cfg = model_preset("nano")
    model = AvaForCausalLM(cfg).train()
    data = torch.randint(0, cfg.vocab_size, (8, 33))
    inputs, labels = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    expert_grad_seen = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.bool)
    first = None
    for _step in range(300):
        out = model(inputs, labels=labels)
        out.loss.backward()
        for i, layer in enumerate(model.layers):
            g = layer.moe.experts.w1.grad  # [E, H, I]
            expert_grad_seen[i] |= g.flatten(1).abs().amax(dim=1) > 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = out.lm_loss.item() if first is None else first
    final = out.lm_loss.item()
    assert first > 5.5  # ~ln(512) at init
    assert final < first / 10, (first, final)
    assert expert_grad_seen.all(), expert_grad_seen
