"""Exported directories made from small random models (the trainer-made ones live in tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ava.config import TokenizerConfig, model_preset
from ava.data.tokenizer import save_atomic, train_tokenizer
from ava.export import export_state_dict
from ava.model import AvaForCausalLM

TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Mixture-of-Experts models route every token to a few experts.",
    "def add(a, b):\n    return a + b\n",
    "Pack my box with five dozen liquor jugs!",
] * 20

MIXTRAL_LIKE = {"norm": "rmsnorm", "activation": "swiglu", "bias": False}


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    tok = train_tokenizer([TEXT], cfg=TokenizerConfig(), vocab_size=512)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_atomic(tok, path)
    return path


def make_model(seed: int = 0, **overrides) -> AvaForCausalLM:
    torch.manual_seed(seed)
    return AvaForCausalLM(model_preset("nano", **overrides)).eval()


@pytest.fixture(scope="session")
def ava_export(tmp_path_factory, tokenizer_file) -> tuple[Path, AvaForCausalLM]:
    model = make_model()
    out = tmp_path_factory.mktemp("exports") / "ava"
    export_state_dict(model.state_dict(), model.cfg, out, tokenizer=tokenizer_file, layout="ava")
    return out, model


@pytest.fixture(scope="session")
def mixtral_export(tmp_path_factory, tokenizer_file) -> tuple[Path, AvaForCausalLM]:
    model = make_model(1, **MIXTRAL_LIKE)
    out = tmp_path_factory.mktemp("exports") / "mixtral"
    export_state_dict(model.state_dict(), model.cfg, out, tokenizer=tokenizer_file, layout="auto")
    return out, model
