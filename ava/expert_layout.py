"""Where Ava's experts sit in DeepSpeed's expert-parallel layers, both ways: shared by the exporter
(an expert-parallel checkpoint into Ava's layout) and the trainer's elastic resume (a checkpoint
from one expert-parallel split into another).

- Ava's own layout (ep=1, and every export): per MoE layer stacked `[E, ...]` tensors named
  `layers.L.moe.experts.<tensor>`: SwiGLU `w_gate_up [E, H, 2I]` and `w_down [E, I, H]`; GELU
  `w1 [E, H, I]`, `b1 [E, I]`, `w2 [E, I, H]`, `b2 [E, H]`.
- DeepSpeed AutoEP: `layers.L.moe.experts.w1|w2|w3`, gate `w1` and up `w3` `[E, I, H]`, down `w2`
  `[E, H, I]` (each EP rank holds its experts' rows).
- Ava's sharded layer (ava.train.sharded_moe): one module per local expert slot,
  `layers.L.moe.deepspeed_moe.experts.deepspeed_experts.<j>.<tensor>` holding Ava's per-expert
  tensors; DeepSpeed's per-expert checkpoint files name slot j of EP rank r by its global index
  r·E/ep + j.
"""

from __future__ import annotations

import re
from typing import Tuple

import torch

AVA_EXPERT = re.compile(r"(.+\.moe)\.experts\.(\w+)")  # layers.0.moe.experts.w_gate_up
SHARDED_EXPERT = re.compile(r"(.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)")
AUTOEP_TENSORS = ("w1", "w2", "w3")


def ava_name(layer: str, tensor: str) -> str:
    return f"{layer}.experts.{tensor}"


def sharded_name(layer: str, slot: int, tensor: str) -> str:
    return f"{layer}.deepspeed_moe.experts.deepspeed_experts.{slot}.{tensor}"


def from_autoep(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """AutoEP's gate, down and up tensors as Ava's `(w_gate_up, w_down)`."""
    return torch.cat([w1, w3], dim=1).transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()


def to_autoep(w_gate_up: torch.Tensor, w_down: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ava's `(w_gate_up, w_down)` as AutoEP's `(w1, w2, w3)`; the inverse of `from_autoep`."""
    inner = w_gate_up.shape[-1] // 2
    gate, up = w_gate_up[..., :inner], w_gate_up[..., inner:]
    return (gate.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous(),
            up.transpose(1, 2).contiguous())
