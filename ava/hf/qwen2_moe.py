"""Qwen2-MoE (`model_type: qwen2_moe`): q/k/v biases, one shared expert behind a sigmoid gate,
dense layers by `mlp_only_layers`/`decoder_sparse_step`."""

from __future__ import annotations

from typing import Any, Mapping

from ava.config import ModelConfig
from ava.hf.family import common_config, common_fields, dense_layer_ids, sparse_layers

MODEL_TYPE = "qwen2_moe"


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    shared = int(config.get("shared_expert_intermediate_size") or 0)
    return ModelConfig(**common_fields(config), ffn_size=config["moe_intermediate_size"],
                       num_experts=config["num_experts"], top_k=config["num_experts_per_tok"],
                       normalize_top_k=bool(config.get("norm_topk_prob", False)),
                       attn_bias=bool(config.get("qkv_bias", True)), dense_layers=sparse_layers(config),
                       dense_ffn_size=config["intermediate_size"], shared_experts=1 if shared else 0,
                       shared_ffn_size=shared or None, shared_expert_gate=bool(shared))


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    shared = cfg.shared_experts * (cfg.shared_ffn_size or cfg.ffn_size)
    return {**common_config(cfg, MODEL_TYPE, "Qwen2MoeForCausalLM"), "moe_intermediate_size": cfg.ffn_size,
            "intermediate_size": cfg.dense_ffn_size or cfg.ffn_size, "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.top_k, "norm_topk_prob": cfg.normalize_top_k, "qkv_bias": cfg.attn_bias,
            "shared_expert_intermediate_size": shared, "mlp_only_layers": dense_layer_ids(cfg),
            "decoder_sparse_step": 1, "use_sliding_window": False, "sliding_window": None,
            "router_aux_loss_coef": cfg.aux_loss_coef}
