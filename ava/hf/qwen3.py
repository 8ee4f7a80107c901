"""Qwen3 (`model_type: qwen3`): dense, GQA, per-head q/k RMSNorm, an explicit head_dim."""

from __future__ import annotations

from typing import Any, Mapping

from ava.config import ModelConfig
from ava.hf.family import common_fields, dense_fields, refuse

MODEL_TYPE = "qwen3"


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    refuse(config, "attention_bias", lambda v: not v, "Ava has no bias on Qwen3's o projection")
    return ModelConfig(**common_fields(config), **dense_fields(config), qk_norm="head")
