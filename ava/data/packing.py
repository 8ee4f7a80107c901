"""Tokenize documents (`datasets.map`), concatenate them with EOS, and view the stream as blocks.

The token stream of a split is one flat file of ids (no header), read back as a numpy memmap.
Blocks are `seq_len + 1` tokens long and start every `seq_len` tokens, so consecutive blocks
share one token: block `i` gives inputs `stream[i*L : i*L+L]` and labels shifted by one, and
every token after the first is a label exactly once. Nothing is padded; the last partial
block (fewer than `seq_len` tokens) is not used. Documents are separated by EOS, and their start
offsets are stored beside the stream, so `data.document_mask=true` can keep attention inside
each document of a block (`segments`).

Conversations (`data.kind=chat`) are packed differently: a conversation is never cut across
blocks. Each is placed whole in the current block of `seq_len + 1` tokens, or, when it does not
fit, starts the next one (the rest of the block is padding, never a target). Blocks are stored
as rows, with a target flag and a document number per token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

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
    """Append every document's ids, in order, to the flat file `path`, and their start offsets
    to `path` with suffix `.docs`; returns the token count."""
    total = 0
    with path.open("wb") as handle, path.with_suffix(".docs").open("wb") as starts:
        if tokenized is not None and len(tokenized):
            for table in tokenized.with_format("arrow").iter(batch_size=batch_size):
                column = table.column("ids").combine_chunks()
                (column.offsets.to_numpy()[:-1].astype(np.int64) + total).tofile(starts)
                values = pc.list_flatten(column).to_numpy()
                values.astype(dtype, copy=False).tofile(handle)
                total += len(values)
    return total


def tokenize_chat(dataset, tokenizer, *, eos_id: int, eos_target: bool, dtype: np.dtype, num_proc: int,
                  batch_size: int, cache_file: Path, desc: str, fingerprint: str):
    """`datasets.map` from rendered spans (`segments`, `targets`) to `ids` and per-token `targets`.
    Each span is tokenized alone, so a target token never straddles a span boundary; an EOS closes
    every conversation (a target only with data.train_on=all)."""
    from datasets import Features, Sequence, Value

    def encode(batch):
        ids, targets = [], []
        for spans, flags in zip(batch["segments"], batch["targets"], strict=True):
            row, row_targets = [], []
            for enc, flag in zip(tokenizer.encode_batch(spans, add_special_tokens=False), flags, strict=True):
                row += enc.ids
                row_targets += [flag] * len(enc.ids)
            ids.append([*row, eos_id])
            targets.append([*row_targets, eos_target])
        return {"ids": ids, "targets": targets, "location": batch["location"]}

    return dataset.map(encode, batched=True, batch_size=batch_size,
                       num_proc=min(num_proc, max(1, len(dataset))),
                       remove_columns=dataset.column_names,
                       features=Features({"ids": Sequence(Value(dtype.name)), "targets": Sequence(Value("bool")),
                                          "location": Value("string")}),
                       cache_file_name=str(cache_file), load_from_cache_file=False,
                       new_fingerprint=fingerprint, desc=desc)


def pack_conversations(rows: Iterator[Tuple[str, List[int], List[bool]]], block_len: int, pad_id: int,
                       overlong: str, on_truncate, on_drop) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """Blocks `(ids, targets, segments, tokens used)` of `block_len` tokens from `(location, ids, targets)` rows.
    An over-long conversation is truncated to `block_len` (`on_truncate(location)`) or dropped
    (`on_drop(location, detail)`); one left without a target is dropped too."""
    def empty() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.full(block_len, pad_id, dtype=np.int64), np.zeros(block_len, dtype=np.uint8),
                np.zeros(block_len, dtype=np.int32))

    ids, targets, segments = empty()
    fill = docs = 0
    for location, row_ids, row_targets in rows:
        n = len(row_ids)
        if n > block_len:
            if overlong == "drop":
                on_drop(location, f"{n} tokens, over seq_len + 1 = {block_len} (data.chat.overlong=drop)")
                continue
            row_ids, row_targets, n = row_ids[:block_len], row_targets[:block_len], block_len
            if not any(row_targets[1:]):
                on_drop(location, f"truncated to seq_len + 1 = {block_len} tokens it keeps no target")
                continue
            on_truncate(location)
        if fill + n > block_len:
            segments[fill:] = docs  # the padding is a document of its own, with no target
            yield ids, targets, segments, fill
            ids, targets, segments = empty()
            fill = docs = 0
        ids[fill:fill + n] = row_ids
        targets[fill:fill + n] = row_targets
        segments[fill:fill + n] = docs
        fill += n
        docs += 1
    if fill:
        segments[fill:] = docs
        yield ids, targets, segments, fill


def write_blocks(blocks: Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray, int]], path: Path,
                 dtype: np.dtype) -> Tuple[int, int]:
    """Rows of ids to `path`, their targets and segments beside it; returns (blocks, tokens
    that are not padding)."""
    count = tokens = 0
    with path.open("wb") as out, path.with_suffix(".targets").open("wb") as flags, \
            path.with_suffix(".segments").open("wb") as segs:
        for ids, targets, segments, used in blocks:
            ids.astype(dtype).tofile(out)
            targets.tofile(flags)
            segments.tofile(segs)
            count += 1
            tokens += used
    return count, tokens


def _memmap(path: Path, dtype: np.dtype, count: Optional[int], what: str = "values") -> np.ndarray:
    size = path.stat().st_size
    if size % dtype.itemsize or (count is not None and size != count * dtype.itemsize):
        raise ValueError(f"{path}: {size} bytes does not hold the expected {count} {dtype.name} {what}; "
                         f"delete the cache directory {path.parent} to rebuild it")
    return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)


def relative_segments(documents: np.ndarray) -> np.ndarray:
    """Document numbers of a block's tokens, counted from 0 at the block's first token."""
    return (documents - documents[0]).astype(np.int64)


class TokenBlocks:
    """Blocks of `seq_len + 1` ids over a memory-mapped token stream (see module docstring).

    `len(blocks)` is the number of whole blocks; `blocks[i]` is a read-only numpy view. Every
    token is a target (`targets` is None); `segments(i)` numbers the documents of block `i`.
    """

    targets = None

    def __init__(self, path: Path, dtype: np.dtype, seq_len: int,
                 num_tokens: Optional[int] = None) -> None:
        self.path = Path(path)
        self.seq_len = seq_len
        self.tokens = _memmap(self.path, dtype, num_tokens, "tokens")
        self._starts: Optional[np.ndarray] = None

    @property
    def starts(self) -> np.ndarray:
        """Document start offsets, opened on first use (only document masking needs them)."""
        if self._starts is None:
            self._starts = _memmap(self.path.with_suffix(".docs"), np.dtype(np.int64), None)
        return self._starts

    def segments(self, index: int) -> np.ndarray:
        positions = np.arange(index * self.seq_len, index * self.seq_len + self.seq_len + 1)
        return relative_segments(np.searchsorted(self.starts, positions, side="right"))

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


class ChatBlocks:
    """Packed conversation blocks stored as rows of `seq_len + 1` ids (see module docstring), with
    `targets(i)` (True where the token is a loss target) and `segments(i)`."""

    def __init__(self, path: Path, dtype: np.dtype, seq_len: int, num_blocks: int) -> None:
        self.path = Path(path)
        self.seq_len = seq_len
        width = seq_len + 1
        self.rows = _memmap(self.path, dtype, num_blocks * width, "tokens").reshape(num_blocks, width)
        self.flags = _memmap(self.path.with_suffix(".targets"), np.dtype(np.uint8),
                             num_blocks * width).reshape(num_blocks, width)
        self.documents = _memmap(self.path.with_suffix(".segments"), np.dtype(np.int32),
                                 num_blocks * width).reshape(num_blocks, width)

    @property
    def num_tokens(self) -> int:
        return self.rows.size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range [0, {len(self)})")
        return self.rows[index]

    def targets(self, index: int) -> np.ndarray:
        return self.flags[index].astype(bool)

    def segments(self, index: int) -> np.ndarray:
        return relative_segments(self.documents[index])
