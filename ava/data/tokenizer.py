"""Byte-level BPE tokenizer (`tokenizers`): load one, or train one and cache it.

Byte-level pre-tokenization and decoding with no normalizer make `decode(encode(x)) == x` for
every string. The special tokens come first in the vocabulary. The agreement rule with the
model: a tokenizer with more ids than the model's embedding table is an error; fewer is fine
(BPE may run out of merges on a small corpus) and the unused rows are reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, List, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ava.config import TokenizerConfig
from ava.data.errors import DataSourceError, TokenizerMismatchError
from ava.files import atomic_write

log = logging.getLogger(__name__)


def target_vocab_size(cfg: TokenizerConfig, model_vocab_size: int) -> int:
    """The vocab size to train for; a request above the model's size fails before training."""
    size = cfg.vocab_size if cfg.vocab_size is not None else model_vocab_size
    if size > model_vocab_size:
        raise TokenizerMismatchError(_too_large(size, model_vocab_size))
    return size


def _too_large(tokenizer_size: int, model_vocab_size: int) -> str:
    return (f"the tokenizer has {tokenizer_size} ids but the model's embedding table has "
            f"{model_vocab_size} rows (model.vocab_size={model_vocab_size}); raise "
            f"model.vocab_size to at least {tokenizer_size}, or lower data.tokenizer.vocab_size "
            "(or use a smaller data.tokenizer.path)")


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Number of ids the tokenizer can emit (largest id + 1, added tokens included)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def check_agreement(tokenizer_size: int, model_vocab_size: int) -> Optional[str]:
    """Raise if the tokenizer is larger than the model; else the one-line note to log when
    some embedding rows will never be used (None when the sizes are equal)."""
    if tokenizer_size > model_vocab_size:
        raise TokenizerMismatchError(_too_large(tokenizer_size, model_vocab_size))
    unused = model_vocab_size - tokenizer_size
    if unused:
        return (f"tokenizer has {tokenizer_size} ids, model.vocab_size={model_vocab_size}: "
                f"{unused} embedding rows are unused")
    return None


def special_ids(tokenizer: Tokenizer, cfg: TokenizerConfig, where: str) -> tuple[int, int]:
    """(eos_id, pad_id); a loaded tokenizer without them is an error naming the file."""
    ids = []
    for key in ("eos_token", "pad_token"):
        token = getattr(cfg, key)
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise DataSourceError(f"{where}: the tokenizer has no {token!r} token "
                                  f"(data.tokenizer.{key})")
        ids.append(token_id)
    return ids[0], ids[1]


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type
        raise DataSourceError(f"{path}: cannot load tokenizer ({exc}); check "
                              "data.tokenizer.path") from exc


def training_key(cfg: TokenizerConfig, vocab_size: int, corpus_key: str) -> str:
    """Cache key of a trained tokenizer: the training corpus and every training setting."""
    settings = {"corpus": corpus_key, "vocab_size": vocab_size,
                "min_frequency": cfg.min_frequency, "special_tokens": list(cfg.special_tokens),
                "kind": "byte_level_bpe", "version": 1}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def train_tokenizer(texts: Iterable[List[str]], *, cfg: TokenizerConfig, vocab_size: int,
                    length: Optional[int] = None, progress: bool = False) -> Tokenizer:
    """Train byte-level BPE on batches of texts."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=list(cfg.special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def save_atomic(tokenizer: Tokenizer, path: Path) -> None:
    """Written atomically, so a half-written file is never loaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tokenizer.save(str(tmp)))
