"""`model`: the architecture of an Ava MoE transformer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from ava.config.checks import one_of, require

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")
ROUTINGS = ("topk", "sinkhorn")
OVERFLOWS = ("drop", "next_best", "residual")
EXPERT_BACKENDS = ("auto", "grouped_mm", "loop")
QK_NORMS = ("none", "head", "full")
ROUTER_SCORES = ("softmax", "sigmoid")
AUX_LOSS_SCOPES = ("batch", "sequence")


@dataclass
class ModelConfig:
    """Architecture of an Ava MoE transformer (sizes from DESIGN.md's preset table)."""

    name: str = "custom"
    vocab_size: int = 65536
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    num_kv_heads: Optional[int] = None  # grouped-query attention (Mixtral 8 for 32); null: num_heads
    head_dim: Optional[int] = None  # null: hidden_size / num_heads (Qwen3-MoE sets its own)
    qk_norm: str = "none"  # none | head: RMSNorm per head (Qwen3) | full: over the whole q and k (OLMoE)
    attn_bias: bool = False  # q/k/v biases without an o bias (Qwen2); `bias` adds all four
    ffn_size: int = MISSING
    num_experts: int = MISSING
    top_k: int = 2
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    bias: bool = True
    # dense MLP layers instead of MoE: the first k (DeepSeek's first_k_dense_replace) and/or a list
    first_dense_layers: int = 0
    dense_layers: List[int] = field(default_factory=list)  # Qwen's mlp_only_layers
    dense_ffn_size: Optional[int] = None  # null: ffn_size
    shared_experts: int = 0  # experts every token passes through besides its routed ones
    shared_ffn_size: Optional[int] = None  # width of each shared expert; null: ffn_size
    shared_expert_gate: bool = False  # a per-token sigmoid gate on the shared output (Qwen2-MoE)
    router_score: str = "softmax"  # softmax | sigmoid (DeepSeek-V3)
    normalize_top_k: bool = True  # renormalise the chosen weights to sum to 1 (OLMoE: false)
    routed_scaling_factor: float = 1.0  # the routed output's scale (DeepSeek-V3: 2.5)
    # auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for
    # choosing experts only, moved by bias_update_rate x sign(mean load - load) after each step
    expert_bias: bool = False
    bias_update_rate: float = 0.001
    routing: str = "topk"
    sinkhorn_iters: int = 3
    router_jitter: float = 0.01
    capacity_factor: Optional[float] = 3.0
    eval_capacity_factor: Optional[float] = None
    overflow: str = "drop"
    aux_loss_coef: float = 0.01
    aux_loss_scope: str = "batch"  # batch | sequence (DeepSeek-V3's sequence-wise balance loss)
    z_loss_coef: float = 0.001
    init_std: float = 0.02
    tie_embeddings: bool = True
    activation_checkpointing: bool = False
    expert_backend: str = "auto"
    # `auto` on a CPU: the per-expert loop from this many routed rows per expert (T·k/E) up, the
    # grouped matmul below it (`ava-bench moe`: the loop wins from ~512 rows, loses at 128)
    loop_min_rows_per_expert: int = 256
    # training: the LM head's loss this many rows at a time, never the full [B·L, V] logits
    # (null: the full logits, and they are returned); far fewer rows make the head's matmuls
    # skinny and slow, far more give the memory back
    loss_chunk_rows: Optional[int] = 256

    def __post_init__(self) -> None:
        if MISSING in (self.hidden_size, self.num_layers, self.num_heads, self.ffn_size):
            return  # an unfilled schema node inside Hydra; validated once values arrive
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size",
                    "num_experts", "top_k", "max_seq_len", "sinkhorn_iters", "loop_min_rows_per_expert"):
            value = getattr(self, key)
            require(value > 0, f"model.{key}={value} must be a positive integer")
        for key in ("num_kv_heads", "head_dim", "dense_ffn_size", "shared_ffn_size", "loss_chunk_rows"):
            value = getattr(self, key)
            require(value is None or value > 0, f"model.{key}={value} must be a positive integer or null")
        if self.head_dim is None:
            require(self.hidden_size % self.num_heads == 0,
                     f"model.hidden_size={self.hidden_size} must be divisible by "
                     f"model.num_heads={self.num_heads} (or set model.head_dim)")
        require(self.dim_per_head % 2 == 0,
                 f"model.head_dim={self.dim_per_head} (hidden_size/num_heads unless set) "
                 "must be even for rotary embeddings")
        require(self.num_heads % self.kv_heads == 0,
                 f"model.num_kv_heads={self.kv_heads} must divide model.num_heads={self.num_heads}")
        one_of("model.qk_norm", self.qk_norm, QK_NORMS)
        one_of("model.router_score", self.router_score, ROUTER_SCORES)
        one_of("model.aux_loss_scope", self.aux_loss_scope, AUX_LOSS_SCOPES)
        require(self.first_dense_layers >= 0 and self.shared_experts >= 0,
                 f"model.first_dense_layers={self.first_dense_layers} and "
                 f"model.shared_experts={self.shared_experts} must be >= 0")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        require(not bad, f"model.dense_layers={list(self.dense_layers)}: {bad} are not layer indices "
                         f"0..{self.num_layers - 1}")
        require(self.first_dense_layers <= self.num_layers,
                 f"model.first_dense_layers={self.first_dense_layers} exceeds model.num_layers={self.num_layers}")
        require(not self.shared_expert_gate or self.shared_experts > 0,
                 "model.shared_expert_gate=true needs model.shared_experts > 0")
        require(self.bias_update_rate > 0, f"model.bias_update_rate={self.bias_update_rate} must be positive")
        require(not (self.expert_bias and self.routing == "sinkhorn"),
                 "model.expert_bias=true and model.routing='sinkhorn' both rebalance the choice of experts: "
                 "pick one")
        require(self.routed_scaling_factor > 0,
                 f"model.routed_scaling_factor={self.routed_scaling_factor} must be positive")
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
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def moe_layers(self) -> List[int]:
        """Indices of the layers with an MoE FFN (the rest are dense)."""
        dense = set(self.dense_layers) | set(range(self.first_dense_layers))
        return [i for i in range(self.num_layers) if i not in dense]


@dataclass
class UpcycleConfig:
    """Upcycling a dense checkpoint (`init_from`): every MLP becomes `num_experts` experts that
    start as copies of it (0: off)."""

    num_experts: int = 0
    top_k: int = 2
    noise: float = 0.0  # std of the Gaussian perturbation of each copy, relative to the weights' std

    def __post_init__(self) -> None:
        require(self.num_experts >= 0, f"upcycle.num_experts={self.num_experts} must be >= 0 (0: off)")
        require(self.noise >= 0, f"upcycle.noise={self.noise} must be >= 0")
        if self.num_experts:
            require(0 < self.top_k <= self.num_experts,
                     f"upcycle.top_k={self.top_k} must be in 1..upcycle.num_experts={self.num_experts}")
