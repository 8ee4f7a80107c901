"""Ava's data pipeline: sources → validation (and, for chat, the template) → byte-level BPE → packed
token cache → loader.

    prepared = prepare_data(cfg.data, model_vocab_size=cfg.model.vocab_size, seed=cfg.seed)
    loader = BlockLoader(prepared.train, micro_batch_size=8, rank=r, world_size=w, seed=s)
    batch = next(loader)  # {"input_ids": LongTensor[8, seq_len], "labels": ...}

Imports nothing from Ava but `ava.config`.
"""

from ava.data.builtin import python_docs_documents
from ava.data.errors import (
    DataError,
    DataSourceError,
    DataValidationError,
    TokenizerMismatchError,
)
from ava.data.loader import BlockLoader, Blocks
from ava.data.packing import ChatBlocks, TokenBlocks
from ava.data.prepare import PreparedData, prepare_data
from ava.data.sources import check_sources
from ava.data.validate import ValidationReport

__all__ = [
    "BlockLoader",
    "Blocks",
    "ChatBlocks",
    "DataError",
    "DataSourceError",
    "DataValidationError",
    "PreparedData",
    "TokenBlocks",
    "TokenizerMismatchError",
    "ValidationReport",
    "check_sources",
    "prepare_data",
    "python_docs_documents",
]
