"""Qwen3 (`model_type: qwen3`): dense, GQA, per-head q/k RMSNorm, an explicit head_dim."""

from __future__ import annotations

from typing import Any, Mapping

from ava.config import ModelConfig
from ava.hf.family import common_config, common_fields, dense_fields, refuse

MODEL_TYPE = "qwen3"


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    refuse(config, "attention_bias", lambda v: not v, "Ava has no bias on Qwen3's o projection")
    return ModelConfig(**common_fields(config), **dense_fields(config), qk_norm="head")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**common_config(cfg, MODEL_TYPE, "Qwen3ForCausalLM"),
            "intermediate_size": cfg.dense_ffn_size or cfg.ffn_size,
            "attention_bias": False, "use_sliding_window": False, "sliding_window": None}
