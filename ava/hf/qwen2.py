"""Qwen2 (`model_type: qwen2`; also the DeepSeek-distilled Qwens): dense, GQA, q/k/v biases."""

from __future__ import annotations

from typing import Any, Mapping

from ava.config import ModelConfig
from ava.hf.family import common_config, common_fields, dense_fields

MODEL_TYPE = "qwen2"


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    return ModelConfig(**common_fields(config), **dense_fields(config), attn_bias=True)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**common_config(cfg, MODEL_TYPE, "Qwen2ForCausalLM"),
            "intermediate_size": cfg.dense_ffn_size or cfg.ffn_size,
            "use_sliding_window": False, "sliding_window": None}
