"""`model`: the architecture of an Ava MoE transformer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from ava.config.checks import one_of, require

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")
ROUTINGS = ("topk", "sinkhorn")
OVERFLOWS = ("drop", "next_best", "residual")
EXPERT_BACKENDS = ("auto", "grouped_mm", "loop")


@dataclass
class ModelConfig:
    """Architecture of an Ava MoE transformer (sizes from DESIGN.md's preset table)."""

    name: str = "custom"
    vocab_size: int = 65536
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    ffn_size: int = MISSING
    num_experts: int = MISSING
    top_k: int = 2
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    bias: bool = True
    routing: str = "topk"
    sinkhorn_iters: int = 3
    router_jitter: float = 0.01
    capacity_factor: Optional[float] = 3.0
    eval_capacity_factor: Optional[float] = None
    overflow: str = "drop"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    init_std: float = 0.02
    tie_embeddings: bool = True
    activation_checkpointing: bool = False
    expert_backend: str = "auto"
    # `auto` on a CPU: the per-expert loop from this many routed rows per expert (T·k/E) up, the
    # grouped matmul below it (`ava-bench moe`: the loop wins from ~512 rows, loses at 128)
    loop_min_rows_per_expert: int = 256

    def __post_init__(self) -> None:
        if MISSING in (self.hidden_size, self.num_layers, self.num_heads, self.ffn_size):
            return  # an unfilled schema node inside Hydra; validated once values arrive
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size",
                    "num_experts", "top_k", "max_seq_len", "sinkhorn_iters", "loop_min_rows_per_expert"):
            value = getattr(self, key)
            require(value > 0, f"model.{key}={value} must be a positive integer")
        require(self.hidden_size % self.num_heads == 0,
                 f"model.hidden_size={self.hidden_size} must be divisible by "
                 f"model.num_heads={self.num_heads}")
        require((self.hidden_size // self.num_heads) % 2 == 0,
                 f"model.hidden_size/model.num_heads={self.hidden_size // self.num_heads} "
                 "must be even for rotary embeddings")
        require(self.top_k <= self.num_experts,
                 f"model.top_k={self.top_k} must not exceed model.num_experts={self.num_experts}")
        one_of("model.norm", self.norm, NORMS)
        one_of("model.activation", self.activation, ACTIVATIONS)
        one_of("model.routing", self.routing, ROUTINGS)
        one_of("model.overflow", self.overflow, OVERFLOWS)
        one_of("model.expert_backend", self.expert_backend, EXPERT_BACKENDS)
        require(not (self.activation == "swiglu" and self.bias),
                 "model.activation='swiglu' experts have no biases; set model.bias=false")
        for key in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, key)
            require(value is None or value > 0,
                     f"model.{key}={value} must be positive, or null for dropless routing")
        for key in ("router_jitter", "aux_loss_coef", "z_loss_coef"):
            value = getattr(self, key)
            require(value >= 0, f"model.{key}={value} must be >= 0")
        require(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads
