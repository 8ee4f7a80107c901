"""The implementations `ava-bench moe` compares, all built from one set of weights.

Every MoE peer routes with the same linear router (softmax -> top-k -> renormalise), so identical
weights and inputs give identical routing. Each peer maps `x_TH -> y_TH` and owns a copy of the
weights (gradients never mix).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ava.config import ModelConfig
from ava.model.moe import MoELayer


@dataclass
class MoEWeights:
    """Canonical SwiGLU MoE weights: router `[E,H]`, gate/up `[E,H,I]`, down `[E,I,H]`."""

    router_EH: torch.Tensor
    gate_EHI: torch.Tensor
    up_EHI: torch.Tensor
    down_EIH: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        e, h, i = self.gate_EHI.shape
        return e, h, i

    @classmethod
    def random(cls, num_experts: int, hidden: int, ffn: int, *, skew: float, mean_norm: float,
               generator: torch.Generator) -> MoEWeights:
        """Router logits ~ N(0, 1) per expert; with `skew` > 0 expert e gets an extra
        `-skew * log(e + 1)` on inputs whose mean has norm `mean_norm` (a Zipf-like load)."""
        e, h, i = num_experts, hidden, ffn
        router = torch.randn(e, h, generator=generator) / h**0.5
        u = torch.ones(h) / h**0.5
        router = router - (router @ u)[:, None] * u[None, :]  # the inputs' mean favours no expert
        if skew > 0:
            bias_E = -skew * torch.log(torch.arange(1, e + 1, dtype=torch.float32))
            router = router + (bias_E / mean_norm)[:, None] * u[None, :]
        std_in, std_out = h**-0.5, i**-0.5
        return cls(
            router_EH=router,
            gate_EHI=torch.randn(e, h, i, generator=generator) * std_in,
            up_EHI=torch.randn(e, h, i, generator=generator) * std_in,
            down_EIH=torch.randn(e, i, h, generator=generator) * std_out,
        )


def make_inputs(tokens: int, hidden: int, *, mean_norm: float, generator: torch.Generator) -> torch.Tensor:
    """`N(0, I)` tokens shifted by a common mean of norm `mean_norm` (what skewed routing keys on)."""
    u = torch.ones(hidden) / hidden**0.5
    return torch.randn(tokens, hidden, generator=generator) + mean_norm * u


def route(x_TH: torch.Tensor, router_EH: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax -> top-k -> renormalise (what every peer computes). Returns (weight_TK, expert_TK)."""
    probs = torch.softmax(F.linear(x_TH, router_EH).float(), dim=-1)
    weight, expert = probs.topk(top_k, dim=-1)
    return weight / weight.sum(dim=-1, keepdim=True), expert


def ava_layer(w: MoEWeights, top_k: int, backend: str = "auto", **options: Any) -> nn.Module:
    """Ava's `MoELayer` (SwiGLU, no bias, dropless, no jitter) loaded with `w`; `options` are
    further `ModelConfig` settings (sigmoid routing, expert bias, shared experts: the shared
    experts get the first experts' weights, the bias a fixed spread of ±0.05)."""
    e, h, i = w.shape
    cfg = ModelConfig(name="bench", vocab_size=256, hidden_size=h, num_layers=1, num_heads=1, ffn_size=i,
                      num_experts=e, top_k=top_k, norm="rmsnorm", activation="swiglu", bias=False,
                      router_jitter=0.0, capacity_factor=None, expert_backend=backend, **options)
    layer = MoELayer(cfg)
    with torch.no_grad():
        if layer.router.balance_bias is not None:
            layer.router.balance_bias.copy_(torch.linspace(-0.05, 0.05, e))
        if layer.shared is not None:
            n = cfg.shared_experts
            ffn = layer.shared.ffn
            ffn.gate_proj.weight.copy_(w.gate_EHI[:n].permute(0, 2, 1).reshape(n * i, h))
            ffn.up_proj.weight.copy_(w.up_EHI[:n].permute(0, 2, 1).reshape(n * i, h))
            ffn.down_proj.weight.copy_(w.down_EIH[:n].reshape(n * i, h).t())
        layer.router.gate.weight.copy_(w.router_EH)
        layer.experts.w_gate_up.copy_(torch.cat([w.gate_EHI, w.up_EHI], dim=2))
        layer.experts.w_down.copy_(w.down_EIH)
    return layer


class _FirstOutput(nn.Module):
    """Adapts a module returning `(y, extras...)` to return `y` alone."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[0]


class NaiveMoE(nn.Module):
    """The architecture document's per-expert masked loop: for each expert, the tokens that chose
    it, its FFN, weighted, added back. The naive reference (one host sync per expert)."""

    def __init__(self, w: MoEWeights, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Parameter(w.router_EH.clone())
        self.gate = nn.Parameter(w.gate_EHI.clone())
        self.up = nn.Parameter(w.up_EHI.clone())
        self.down = nn.Parameter(w.down_EIH.clone())

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        weight_TK, expert_TK = route(x_TH, self.router, self.top_k)
        out = torch.zeros_like(x_TH)
        for e in range(self.gate.shape[0]):
            mask_TK = expert_TK == e
            if not mask_TK.any():
                continue
            token, slot = mask_TK.nonzero(as_tuple=True)
            xe = x_TH[token]
            ye = (F.silu(xe @ self.gate[e]) * (xe @ self.up[e])) @ self.down[e]
            out = out.index_add(0, token, ye * weight_TK[token, slot, None].to(ye.dtype))
        return out


class DenseMLP(nn.Module):
    """SwiGLU MLP of intermediate size `top_k * I`: the FLOPs of the k active experts, no routing."""

    def __init__(self, w: MoEWeights, top_k: int) -> None:
        super().__init__()
        e, h, i = w.shape
        idx = torch.arange(top_k) % e
        self.gate = nn.Linear(h, top_k * i, bias=False)
        self.up = nn.Linear(h, top_k * i, bias=False)
        self.down = nn.Linear(top_k * i, h, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(w.gate_EHI[idx].permute(0, 2, 1).reshape(top_k * i, h))
            self.up.weight.copy_(w.up_EHI[idx].permute(0, 2, 1).reshape(top_k * i, h))
            self.down.weight.copy_(w.down_EIH[idx].reshape(top_k * i, h).t())

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x_TH)) * self.up(x_TH))


class Roofline(nn.Module):
    """Raw matmuls of the same FLOPs: `x_TH @ W` with `W [H, k*I]`, 9 times (the forward's 3 and
    the backward's 6 matmuls of that size), no autograd, no routing: the FLOPs at matmul speed."""

    def __init__(self, w: MoEWeights, top_k: int) -> None:
        super().__init__()
        _, h, i = w.shape
        self.register_buffer("w", torch.randn(h, top_k * i), persistent=False)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        x = x_TH.detach()
        out = torch.empty(x.shape[0], self.w.shape[1], dtype=x.dtype, device=x.device)
        for _ in range(9):
            torch.mm(x, self.w, out=out)
        return out


def hf_mixtral_block(w: MoEWeights, top_k: int, implementation: str) -> nn.Module:
    """`transformers`' `MixtralSparseMoeBlock` with `w` loaded (`experts_implementation`: its
    default `grouped_mm`, or the `eager` per-expert loop)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    e, h, i = w.shape
    config = MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=top_k,
                           router_jitter_noise=0.0, hidden_act="silu")
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(w.router_EH)
        block.experts.gate_up_proj.copy_(torch.cat([w.gate_EHI, w.up_EHI], dim=2).transpose(1, 2))
        block.experts.down_proj.copy_(w.down_EIH.transpose(1, 2))
    return _Unflatten(block)


class _Unflatten(nn.Module):
    """Feeds `[T, H]` as `[1, T, H]` to a module that wants a batch dimension."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.inner(x_TH[None]).reshape_as(x_TH)


class _SwiGLU(nn.Module):
    def __init__(self, h: int, i: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def init_deepspeed_single_process() -> Optional[str]:
    """A one-rank group for `deepspeed.comm`; returns why it failed, or None."""
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        from ava.train.distributed import init_distributed

        init_distributed()  # the trainer's single-process path: a launcher's env, then DeepSpeed's backend
        return None
    except Exception as exc:  # reported in the table, never silently dropped
        return f"deepspeed.comm init failed: {type(exc).__name__}: {exc}"


def deepspeed_moe(w: MoEWeights, top_k: int) -> nn.Module:
    """`deepspeed.moe.layer.MoE`, dropless (`drop_tokens=False`), no random token selection, no
    sampled second expert, so top-2/top-k gating equals Ava's (top-1 does not renormalise)."""
    from deepspeed.moe.layer import MoE

    e, h, i = w.shape
    moe = MoE(hidden_size=h, expert=_SwiGLU(h, i), num_experts=e, ep_size=1, k=top_k, capacity_factor=1.0,
              eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False, use_rts=False,
              top2_2nd_expert_sampling=False)
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(w.router_EH)
        for k, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.gate_proj.weight.copy_(w.gate_EHI[k].t())
            expert.up_proj.weight.copy_(w.up_EHI[k].t())
            expert.down_proj.weight.copy_(w.down_EIH[k].t())
    return _FirstOutput(moe)
