"""Expert FFNs stored as stacked `[E, ...]` tensors, so one grouped matmul serves all experts."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ava.config import ModelConfig


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs this dtype/device/alignment.

    CPU: fp32, or bf16 with 16-byte aligned rows. CUDA: bf16 on Hopper or newer. The weights
    run in `x`'s dtype (`Experts.stacked`), so only their shape matters here.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    aligned = all(s * x.element_size() % 16 == 0 for s in (w.shape[-2], w.shape[-1]))
    if x.device.type == "cpu":
        return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and aligned)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and aligned and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def resolve_backend(backend: str, x: torch.Tensor, w: torch.Tensor, rows_per_expert: float,
                    loop_min_rows: int) -> str:
    """`auto`: the grouped kernel on accelerators that run it (no host sync); on CPUs the
    per-expert loop once experts get `loop_min_rows` rows on average (their rows then stay in
    cache), the grouped kernel for fewer; the loop wherever the kernel cannot run."""
    if backend != "auto":
        return backend
    if not grouped_mm_supported(x, w):
        return "loop"
    return "loop" if x.device.type == "cpu" and rows_per_expert >= loop_min_rows else "grouped_mm"


def grouped_matmul(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Rows of `x` sorted by expert, `counts[e]` of them for expert e, times that expert's matrix.

    Rows past `counts.sum()` (dropped slots) are not computed: their output rows are unspecified.
    """
    offsets = torch.cumsum(counts_E, 0, dtype=torch.int32)
    return torch._grouped_mm(x_NI.contiguous(), w_EIO, offs=offsets)


class Experts(nn.Module):
    """E expert FFNs: `gelu` (w1 [E,H,I], b1 [E,I], w2 [E,I,H], b2 [E,H]) or `swiglu` (no biases).

    SwiGLU stores gate and up fused, `w_gate_up [E,H,2I]` (the first I columns the gate, the last
    I the up projection), and `w_down [E,I,H]`: one GEMM computes both, and expert-parallel
    engines can take the fused tensor as it is ("hidden_first").
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.ffn_size
        self.num_experts, self.activation, self.backend = e, cfg.activation, cfg.expert_backend
        self.loop_min_rows = cfg.loop_min_rows_per_expert
        if cfg.activation == "swiglu":
            self.w_gate_up = nn.Parameter(torch.empty(e, h, 2 * i))
            self.w_down = nn.Parameter(torch.empty(e, i, h))
        else:
            self.w1 = nn.Parameter(torch.empty(e, h, i))
            self.w2 = nn.Parameter(torch.empty(e, i, h))
            self.b1 = nn.Parameter(torch.zeros(e, i)) if cfg.bias else None
            self.b2 = nn.Parameter(torch.zeros(e, h)) if cfg.bias else None

    def stacked(self, dtype: Optional[torch.dtype] = None) -> tuple[Optional[torch.Tensor], ...]:
        """The `[E, ...]` tensors in the order `expert_loop`'s forward for this activation takes them,
        cast to `dtype` if given (autocast: the copy is differentiable, gradients reach the masters)."""
        params = (self.w_gate_up, self.w_down) if self.activation == "swiglu" else (self.w1, self.w2, self.b1, self.b2)
        return params if dtype is None else tuple(None if p is None else p.to(dtype) for p in params)

    def forward(self, x_NH: torch.Tensor, expert_N: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """`x_NH` rows sorted by expert id (`expert_N`), `counts_E` rows per expert; trailing rows
        with `expert_N == E` (dropped slots) are not computed and their outputs are unspecified."""
        if self.activation == "swiglu":
            w_gate_up, w_down = self.stacked(x_NH.dtype)
            gate, up = grouped_matmul(x_NH, w_gate_up, counts_E).chunk(2, dim=-1)
            return grouped_matmul(F.silu(gate) * up, w_down, counts_E)
        w1, w2, b1, b2 = self.stacked(x_NH.dtype)
        h = grouped_matmul(x_NH, w1, counts_E)
        if b1 is not None:
            h = h + _bias_rows(b1, expert_N)
        y = grouped_matmul(F.gelu(h), w2, counts_E)
        if b2 is not None:
            y = y + _bias_rows(b2, expert_N)
        return y


def _bias_rows(b_EO: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
    """Per-row bias; dropped rows (`expert_N == E`) read a zero row whose gradient is discarded,
    so their unspecified values never reach a real bias gradient."""
    return torch.cat([b_EO, b_EO.new_zeros(1, b_EO.shape[-1])])[expert_N]


class DenseFFN(nn.Module):
    """One dense FFN with the experts' activation: a dense layer's MLP, the shared experts (one
    FFN of their summed width computes exactly the sum of their outputs), the `residual`
    overflow path and the dense baseline. `width`: null is the experts' `ffn_size`."""

    def __init__(self, cfg: ModelConfig, width: Optional[int] = None) -> None:
        super().__init__()
        h, i = cfg.hidden_size, width or cfg.ffn_size
        self.activation = cfg.activation
        if cfg.activation == "swiglu":
            self.gate_proj = nn.Linear(h, i, bias=False)
            self.up_proj = nn.Linear(h, i, bias=False)
        else:
            self.up_proj = nn.Linear(h, i, bias=cfg.bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


def init_experts(experts: Experts, std: float, out_std: float) -> None:
    """Normal init; output projections scaled by depth (`out_std`), biases zero."""
    with torch.no_grad():
        for name, p in experts.named_parameters():
            if name.startswith("b"):
                p.zero_()
            else:
                normal_(p, out_std if name in ("w2", "w_down") else std)


def normal_(p: torch.Tensor, std: float) -> None:
    """`p.normal_(0, std)` as drawn in fp32 by torch's CPU generator, whatever `p`'s device and
    dtype (a parameter that ZeRO-3 gathered lives on the accelerator, maybe in bf16): the same
    seed gives the same weights wherever the model is initialised."""
    if p.device.type == "cpu" and p.dtype == torch.float32:
        p.normal_(0.0, std)
    else:
        p.copy_(torch.empty(p.shape).normal_(0.0, std))


def depth_scaled_std(std: float, num_layers: int) -> float:
    """GPT-2 style: residual-branch outputs shrink with depth so the residual stream stays O(1)."""
    return std / math.sqrt(2 * num_layers)
