"""The open families' architecture options (issue 19): grouped-query attention, an explicit
head_dim, q/k norms, q/k/v biases, router variants, shared experts and dense layers, each
against a reference written out here."""

import math

import pytest
import torch
import torch.nn.functional as F

from ava.config import model_preset
from ava.model import AvaForCausalLM
from ava.model.losses import load_balancing_loss, sequence_balancing_loss
from ava.model.router import choose_experts

SWIGLU = {"activation": "swiglu", "bias": False, "norm": "rmsnorm", "router_jitter": 0.0,
          "capacity_factor": None}


def _model(seed: int = 0, **overrides) -> AvaForCausalLM:
    torch.manual_seed(seed)
    return AvaForCausalLM(model_preset("nano", **overrides)).eval()


def _ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_kv_heads_equal_to_heads_is_todays_model_exactly():
    today, explicit = _model(), _model(num_kv_heads=4, head_dim=16)
    assert today.state_dict().keys() == explicit.state_dict().keys()
    assert all(torch.equal(v, explicit.state_dict()[k]) for k, v in today.state_dict().items())
    ids = _ids()
    assert torch.equal(today(ids).logits, explicit(ids).logits)


def test_grouped_query_attention_equals_full_attention_with_repeated_kv_heads():
    gqa = _model(num_kv_heads=2)  # 4 query heads, 2 kv heads of 16: heads 0,1 share kv head 0
    mha = _model(seed=5)
    state = dict(gqa.state_dict())
    for name, t in gqa.state_dict().items():
        if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            per_head = t.view(2, 16, *t.shape[1:])
            state[name] = per_head.repeat_interleave(2, dim=0).reshape(64, *t.shape[1:])
    mha.load_state_dict(state)
    ids = _ids()
    torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, rtol=1e-5, atol=1e-5)
    assert gqa.layers[0].attn.k_proj.weight.shape == (32, 64)


@pytest.mark.parametrize("overrides", [
    {"num_kv_heads": 2},
    {"num_kv_heads": 1, "qk_norm": "head", "attn_bias": True, "head_dim": 24},
    {"num_kv_heads": 2, "qk_norm": "full"},
])
def test_kv_cached_decoding_equals_the_uncached_forward(overrides):
    model = _model(**overrides)
    ids = _ids(seq=10)
    full = model(ids).logits
    out = model(ids[:, :6], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    assert cache[0][0].shape == (2, model.cfg.kv_heads, 6, model.cfg.dim_per_head)  # kv heads only
    for t in range(6, 10):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_qk_norm_normalises_where_each_family_does(qk_norm):
    """q before RoPE: `head` over each head's 16 values (Qwen3), `full` over all 64 (OLMoE)."""
    attn = _model(**SWIGLU, qk_norm=qk_norm, attn_bias=True).layers[0].attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64)
    captured = {}
    attn.q_norm.register_forward_hook(lambda m, i, o: captured.setdefault("q", o))
    attn(x, torch.ones(1, 3, 16), torch.zeros(1, 3, 16))  # cos 1, sin 0: RoPE is the identity
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias)
    if qk_norm == "head":
        expected = _rms(q.view(1, 3, 4, 16), attn.q_norm.weight).transpose(1, 2)
    else:
        expected = _rms(q, attn.q_norm.weight)
    torch.testing.assert_close(captured["q"], expected)
    assert attn.o_proj.bias is None and attn.q_proj.bias is not None  # attn_bias: q/k/v only


def test_router_variants_against_a_reference():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 3.0, 0.5, 2.0]])
    sig = torch.sigmoid(logits)
    top = [[0, 1], [1, 3]]
    for score, normalize, scale in [("softmax", True, 1.0), ("sigmoid", True, 2.5),
                                    ("sigmoid", False, 1.0), ("softmax", False, 1.0)]:
        probs, expert, weight = choose_experts(logits, top_k=2, routing="topk", sinkhorn_iters=0,
                                               training=False, score=score, normalize=normalize, scale=scale)
        s = sig if score == "sigmoid" else torch.softmax(logits, -1)
        expected = torch.stack([s[t, top[t]] for t in range(2)])
        if normalize:
            expected = expected / expected.sum(-1, keepdim=True)
        assert expert.tolist() == top
        torch.testing.assert_close(weight, expected * scale)
        torch.testing.assert_close(probs, s / s.sum(-1, keepdim=True))  # what the balance loss sees


def test_shared_experts_are_the_whole_output_when_routed_experts_are_zero():
    model = _model(**SWIGLU, shared_experts=2, shared_ffn_size=32, shared_expert_gate=True)
    moe = model.layers[0].moe
    with torch.no_grad():
        moe.experts.w_down.zero_()
    x = torch.randn(2, 5, 64)
    ffn = moe.shared.ffn
    assert ffn.down_proj.weight.shape == (64, 64)  # 2 shared experts of 32 as one FFN of 64
    expected = torch.sigmoid(x @ moe.shared.gate.weight.t()) * ffn.down_proj(
        F.silu(ffn.gate_proj(x)) * ffn.up_proj(x))
    torch.testing.assert_close(moe(x), expected)


def test_dense_layers_are_plain_mlps_and_a_dense_model_has_no_balance_loss():
    model = _model(**SWIGLU, first_dense_layers=1, dense_ffn_size=96, num_layers=3, dense_layers=[2])
    assert model.cfg.moe_layers == [1]
    assert [b.moe is None for b in model.layers] == [True, False, True]
    block = model.layers[0]
    x = torch.randn(1, 4, 64)
    mlp = block.mlp
    assert mlp.up_proj.weight.shape == (96, 64)
    rope = model.rotary(torch.arange(4)[None])
    y = x + block.attn(block.attn_norm(x), *rope)[0]
    n = block.moe_norm(y)
    torch.testing.assert_close(block(x, *rope)[0], y + mlp.down_proj(F.silu(mlp.gate_proj(n)) * mlp.up_proj(n)))
    out = model(_ids(), labels=_ids())
    assert len(out.router_stats) == 1
    dense = _model(**SWIGLU, first_dense_layers=2)
    out = dense(_ids(), labels=_ids())
    assert out.router_stats == [] and float(out.aux_loss) == 0.0 and float(out.z_loss) == 0.0
    assert math.isfinite(out.loss.item())


def test_parameter_counts_match_the_closed_form():
    """DeepSeek-shaped: GQA with head_dim 24, q/k head norms, a dense first layer, a gated
    shared expert, sigmoid routing; untied embeddings."""
    h, v, layers, heads, kv, d, ffn, experts, k = 64, 512, 3, 4, 2, 24, 32, 8, 3
    shared, dense_ffn = 48, 160
    model = _model(**SWIGLU, num_layers=layers, num_kv_heads=kv, head_dim=d, qk_norm="head", ffn_size=ffn,
                   num_experts=experts, top_k=k, first_dense_layers=1, dense_ffn_size=dense_ffn,
                   shared_experts=1, shared_ffn_size=shared, shared_expert_gate=True, router_score="sigmoid",
                   tie_embeddings=False)
    attn = h * heads * d + 2 * h * kv * d + heads * d * h + 2 * d  # q, k, v, o; q/k norms of head_dim
    norms = 2 * h
    expert = 3 * h * ffn
    moe_fixed = h * experts + 3 * h * shared + h  # router, shared expert, its gate
    total = 2 * v * h + h + layers * (attn + norms) + 3 * h * dense_ffn + (layers - 1) * (moe_fixed + experts * expert)
    active = total - (layers - 1) * (experts - k) * expert
    assert model.num_parameters() == total
    assert model.num_parameters(active_only=True) == active
    matmuls = active - v * h  # the input embedding is a lookup; the untied head is a matmul
    assert model.flops_per_token(16) == 6 * matmuls + 12 * layers * heads * d * 16


def test_sequence_balance_loss_is_the_batch_loss_within_each_sequence():
    probs = torch.softmax(torch.randn(12, 4, generator=torch.Generator().manual_seed(2)), -1)
    expert = probs.topk(2, dim=-1).indices
    per_sequence = [load_balancing_loss(probs_TE=probs[i:i + 4], expert_TK=expert[i:i + 4]) for i in (0, 4, 8)]
    torch.testing.assert_close(sequence_balancing_loss(probs_TE=probs, expert_TK=expert, seq_len=4),
                               torch.stack(per_sequence).mean())
    torch.testing.assert_close(sequence_balancing_loss(probs_TE=probs, expert_TK=expert, seq_len=12),
                               load_balancing_loss(probs_TE=probs, expert_TK=expert))
    # two sequences each routed to one expert: balanced over the batch, collapsed within each
    probs = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    expert = probs.argmax(-1, keepdim=True)
    assert float(load_balancing_loss(probs_TE=probs, expert_TK=expert)) == 1.0
    assert float(sequence_balancing_loss(probs_TE=probs, expert_TK=expert, seq_len=3)) == 2.0


def _skewed_training(expert_bias: bool, steps: int = 60) -> list[float]:
    """An MoE layer whose router sends most tokens to experts 0 and 1, its experts trained with no
    balance loss; the Gini of each step's load, as the trainer's callback sees it. The gate is
    frozen, so the expert bias is the only thing that can move the routing."""
    from ava.model.moe import MoELayer
    from ava.model.routing_stats import RoutingCollector
    from ava.observe.callbacks import StepOutput, TrainState
    from ava.train.expert_bias import ExpertBiasCallback

    torch.manual_seed(0)
    cfg = model_preset("nano", **SWIGLU, num_experts=8, expert_bias=expert_bias, bias_update_rate=0.01,
                       aux_loss_coef=0.0, router_score="sigmoid")
    collector = RoutingCollector()
    layer = MoELayer(cfg, 0, collector).train()
    mu = torch.randn(64)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0.0, 0.1)
        layer.router.gate.weight[:2] += 3 * mu / mu.norm() ** 2  # the inputs' mean favours experts 0 and 1
    layer.router.gate.weight.requires_grad_(False)
    callback = ExpertBiasCallback([layer.router], [0], cfg.bias_update_rate, "cpu") if expert_bias else None
    opt = torch.optim.AdamW(layer.experts.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(64, 64, generator=gen) / 8
    state, ginis = TrainState(), []
    for _ in range(steps):
        x = mu + torch.randn(4, 32, 64, generator=gen)
        if callback:
            callback.pre_step(state)
        loss = (layer(x) - x @ target).pow(2).mean()
        (stats,) = collector.take([0])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if callback:
            callback.post_micro_batch(state, [stats])
            callback.post_step(state, StepOutput(loss.item()))
        ginis.append(float(stats.gini))
    return ginis


def test_auxiliary_loss_free_bias_balances_a_skewed_router():
    with_bias, without = _skewed_training(True), _skewed_training(False)
    assert with_bias[0] == without[0] > 0.6  # same seed, same start: 2 of 8 experts get the tokens
    assert max(with_bias[-10:]) < 0.25  # balanced within 50 steps
    assert min(without[-10:]) > 0.6  # with no balance loss and no bias it stays collapsed


def test_expert_bias_chooses_experts_but_never_weights_them():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    _, expert, weight = choose_experts(logits, top_k=2, routing="topk", sinkhorn_iters=0, training=True,
                                       score="sigmoid", normalize=False, bias_E=bias)
    assert expert.tolist() == [[2, 0]]
    torch.testing.assert_close(weight, torch.sigmoid(logits)[:, [2, 0]])
