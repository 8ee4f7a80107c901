"""OLMoE (`model_type: olmoe`): fine-grained experts without renormalised top-k, q/k RMSNorm
over the whole projections."""

from __future__ import annotations

from typing import Any, Mapping

from ava.config import ModelConfig
from ava.hf.family import common_config, common_fields, refuse

MODEL_TYPE = "olmoe"


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    refuse(config, "clip_qkv", lambda v: v is None, "Ava does not clip q/k/v")
    refuse(config, "attention_bias", lambda v: not v, "Ava has no biases on OLMoE's o projection")
    return ModelConfig(**common_fields(config), ffn_size=config["intermediate_size"],
                       num_experts=config["num_experts"], top_k=config["num_experts_per_tok"],
                       normalize_top_k=bool(config.get("norm_topk_prob", False)), qk_norm="full")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**common_config(cfg, MODEL_TYPE, "OlmoeForCausalLM"), "intermediate_size": cfg.ffn_size,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "norm_topk_prob": cfg.normalize_top_k,
            "clip_qkv": None, "attention_bias": False, "router_aux_loss_coef": cfg.aux_loss_coef}
