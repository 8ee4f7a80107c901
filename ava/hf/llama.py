"""Llama (`model_type: llama`; also TinyLlama and the DeepSeek-distilled Llamas): dense, GQA."""

from __future__ import annotations

from typing import Any, Mapping

from ava.config import ModelConfig
from ava.hf.family import common_config, common_fields, dense_fields, refuse

MODEL_TYPE = "llama"


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    refuse(config, "attention_bias", lambda v: not v, "Ava has no bias on Llama's o projection")
    return ModelConfig(**common_fields(config), **dense_fields(config))


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**common_config(cfg, MODEL_TYPE, "LlamaForCausalLM"),
            "intermediate_size": cfg.dense_ffn_size or cfg.ffn_size,
            "attention_bias": False, "mlp_bias": False}
