"""The Hugging Face families Ava reads, by `model_type` (Mixtral and Ava's own layout live in
`ava.hf.layouts`)."""

from __future__ import annotations

from types import ModuleType

from ava.hf import llama, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe

FAMILIES: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (olmoe, qwen2_moe, qwen3_moe, llama, qwen2, qwen3)}
