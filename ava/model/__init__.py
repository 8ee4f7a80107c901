"""Ava's MoE transformer in plain PyTorch (no sharding, no I/O)."""

from ava.model.moe import MoELayer, RouterStats
from ava.model.transformer import AvaForCausalLM, AvaOutput

__all__ = ["AvaForCausalLM", "AvaOutput", "MoELayer", "RouterStats"]
