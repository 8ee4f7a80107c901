"""Qwen2 (`model_type: qwen2`; also the DeepSeek-distilled Qwens): dense, GQA, q/k/v biases."""

from __future__ import annotations

from typing import Any, Mapping

from ava.config import ModelConfig
from ava.hf.family import common_fields, dense_fields

MODEL_TYPE = "qwen2"


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    return ModelConfig(**common_fields(config), **dense_fields(config), attn_bias=True)
