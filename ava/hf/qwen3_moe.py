"""Qwen3-MoE (`model_type: qwen3_moe`): per-head q/k RMSNorm, an explicit head_dim, dense layers
by `mlp_only_layers`/`decoder_sparse_step`."""

from __future__ import annotations

from typing import Any, Mapping

from ava.config import ModelConfig
from ava.hf.family import common_fields, refuse, sparse_layers

MODEL_TYPE = "qwen3_moe"


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    refuse(config, "attention_bias", lambda v: not v, "Ava has no biases on Qwen3's o projection")
    experts = config.get("num_experts") or config.get("num_local_experts")
    return ModelConfig(**common_fields(config), ffn_size=config["moe_intermediate_size"], num_experts=experts,
                       top_k=config["num_experts_per_tok"], normalize_top_k=bool(config.get("norm_topk_prob", False)),
                       qk_norm="head", dense_layers=sparse_layers(config),
                       dense_ffn_size=config["intermediate_size"])
