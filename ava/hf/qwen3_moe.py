"""Qwen3-MoE (`model_type: qwen3_moe`): per-head q/k RMSNorm, an explicit head_dim, dense layers
by `mlp_only_layers`/`decoder_sparse_step`."""

from __future__ import annotations

from typing import Any, Mapping

from ava.config import ModelConfig
from ava.hf.family import common_config, common_fields, dense_layer_ids, refuse, sparse_layers

MODEL_TYPE = "qwen3_moe"


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    refuse(config, "attention_bias", lambda v: not v, "Ava has no biases on Qwen3's o projection")
    experts = config.get("num_experts") or config.get("num_local_experts")
    return ModelConfig(**common_fields(config), ffn_size=config["moe_intermediate_size"], num_experts=experts,
                       top_k=config["num_experts_per_tok"], normalize_top_k=bool(config.get("norm_topk_prob", False)),
                       qk_norm="head", dense_layers=sparse_layers(config),
                       dense_ffn_size=config["intermediate_size"])


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**common_config(cfg, MODEL_TYPE, "Qwen3MoeForCausalLM"), "moe_intermediate_size": cfg.ffn_size,
            "intermediate_size": cfg.dense_ffn_size or cfg.ffn_size, "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.top_k, "norm_topk_prob": cfg.normalize_top_k,
            "mlp_only_layers": dense_layer_ids(cfg), "decoder_sparse_step": 1, "attention_bias": False,
            "use_sliding_window": False, "sliding_window": None, "router_aux_loss_coef": cfg.aux_loss_coef}
