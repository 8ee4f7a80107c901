"""Shared helpers: small deterministic corpora and `DataConfig`s that cache under tmp_path."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, List

import pytest

from ava.config import DataConfig, SourceConfig, TokenizerConfig

WORDS = ("the", "model", "reads", "tokens", "from", "a", "packed", "stream", "while",
         "experts", "route", "every", "token", "to", "two", "of", "four", "feed", "forward",
         "blocks", "and", "router", "learns", "which", "expert", "fits", "best", "data",
         "loaders", "shuffle", "by", "seed", "epoch", "so", "that", "resume", "is", "exact")


def _make_documents(n: int, seed: int = 0, words: int = 40) -> List[str]:
    """`n` distinct multi-sentence documents with punctuation and some non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(words))
        docs.append(f"Document {i}: {body.capitalize()}. Café — naïve 東京 {i * 7}!")
    return docs


@pytest.fixture
def documents() -> List[str]:
    return _make_documents(60)


@pytest.fixture
def make_documents() -> Callable[..., List[str]]:
    return _make_documents


@pytest.fixture
def data_config(tmp_path: Path) -> Callable[..., DataConfig]:
    """Factory of validated DataConfigs for tests: tiny tokenizer, cache in tmp_path."""

    def make(sources: List[SourceConfig], **overrides) -> DataConfig:
        tokenizer = overrides.pop("tokenizer", TokenizerConfig(vocab_size=384))
        values = {"name": "test", "sources": sources, "seq_len": 16, "val_fraction": 0.1,
                  "cache_dir": str(tmp_path / "cache"), "tokenizer": tokenizer,
                  "batch_size": 16}
        values.update(overrides)
        return DataConfig(**values)

    return make
