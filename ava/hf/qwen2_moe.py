"""Qwen2-MoE (`model_type: qwen2_moe`): q/k/v biases, one shared expert behind a sigmoid gate,
dense layers by `mlp_only_layers`/`decoder_sparse_step`."""

from __future__ import annotations

from typing import Any, Mapping

from ava.config import ModelConfig
from ava.hf.family import common_fields, sparse_layers

MODEL_TYPE = "qwen2_moe"


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    shared = int(config.get("shared_expert_intermediate_size") or 0)
    return ModelConfig(**common_fields(config), ffn_size=config["moe_intermediate_size"],
                       num_experts=config["num_experts"], top_k=config["num_experts_per_tok"],
                       normalize_top_k=bool(config.get("norm_topk_prob", False)),
                       attn_bias=bool(config.get("qkv_bias", True)), dense_layers=sparse_layers(config),
                       dense_ffn_size=config["intermediate_size"], shared_experts=1 if shared else 0,
                       shared_ffn_size=shared or None, shared_expert_gate=bool(shared))
