"""Tokenize documents (`datasets.map`), concatenate them with EOS, and view the stream as blocks.

The token stream of a split is one flat file of ids (no header), read back as a numpy memmap.
Blocks are `seq_len + 1` tokens long and start every `seq_len` tokens, so consecutive blocks
share one token: block `i` gives inputs `stream[i*L : i*L+L]` and labels shifted by one, and
every token after the first is a label exactly once. Nothing is padded; the last partial
block (fewer than `seq_len` tokens) is not used. Documents are separated by EOS only:
attention is *not* reset at document boundaries (out of scope), so a block may attend across
an EOS into the previous document.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.compute as pc

log = logging.getLogger(__name__)

UINT16_IDS = int(np.iinfo(np.uint16).max) + 1  # ids 0..65535 fit in uint16


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65,536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= UINT16_IDS else np.uint32)


def tokenize(dataset, tokenizer, *, eos_id: int, dtype: np.dtype, num_proc: int,
             batch_size: int, cache_file: Path, desc: str, fingerprint: str):
    """`datasets.map` from a `text` column to an `ids` column with EOS appended per document.
    The output goes to `cache_file` (our scratch dir, never the global HF cache)."""
    from datasets import Features, Sequence, Value

    def encode(batch):
        encodings = tokenizer.encode_batch(batch["text"], add_special_tokens=False)
        return {"ids": [[*enc.ids, eos_id] for enc in encodings]}

    return dataset.map(encode, batched=True, batch_size=batch_size,
                       num_proc=min(num_proc, max(1, len(dataset))),
                       remove_columns=dataset.column_names,
                       features=Features({"ids": Sequence(Value(dtype.name))}),
                       cache_file_name=str(cache_file), load_from_cache_file=False,
                       new_fingerprint=fingerprint, desc=desc)


def write_stream(tokenized, path: Path, dtype: np.dtype, batch_size: int) -> int:
    """Append every document's ids, in order, to the flat file `path`; returns the count."""
    total = 0
    with path.open("wb") as handle:
        if tokenized is not None and len(tokenized):
            for table in tokenized.with_format("arrow").iter(batch_size=batch_size):
                values = pc.list_flatten(table.column("ids")).to_numpy()
                values.astype(dtype, copy=False).tofile(handle)
                total += len(values)
    return total


class TokenBlocks:
    """Blocks of `seq_len + 1` ids over a memory-mapped token stream (see module docstring).

    `len(blocks)` is the number of whole blocks; `blocks[i]` is a read-only numpy view.
    """

    def __init__(self, path: Path, dtype: np.dtype, seq_len: int,
                 num_tokens: Optional[int] = None) -> None:
        self.path = Path(path)
        self.seq_len = seq_len
        size = self.path.stat().st_size
        if size % dtype.itemsize or (num_tokens is not None
                                     and size != num_tokens * dtype.itemsize):
            raise ValueError(f"{self.path}: {size} bytes does not hold the expected "
                             f"{num_tokens} {dtype.name} tokens; delete the cache directory "
                             f"{self.path.parent} to rebuild it")
        self.tokens = (np.memmap(self.path, dtype=dtype, mode="r") if size
                       else np.zeros(0, dtype=dtype))

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range [0, {len(self)})")
        start = index * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]
