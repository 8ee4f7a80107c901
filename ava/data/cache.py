"""The on-disk token cache: its key, its layout, and atomic publication.

Layout of `<data.cache_dir>/data/<name>-<key16>/`:
`train.bin`, `val.bin` (token ids), `train.docs`, `val.docs` (int64 start offsets of the documents
of a text stream), `train.targets`, `val.targets` (uint8, 1 = a loss target; chat only),
`train.segments`, `val.segments` (int32, each token's document within its block; chat only),
`tokenizer.json` (the tokenizer used), `report.json`
(validation report) and `meta.json` (sizes, dtype, ids; written last). A cache directory is
built under a hidden scratch name and renamed into place in one step, so a directory with the
final name is always complete: an interrupted preparation leaves only a `.tmp-*` directory,
which is never read (and can be deleted).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE_FORMAT_VERSION = 3  # 2: report.json records the first skipped record; 3: document starts, chat blocks
META = "meta.json"
REPORT = "report.json"
TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"  # chat only: the template the conversations were rendered with
TRAIN = "train.bin"
VAL = "val.bin"
DOCS = ".docs"  # suffixes of a split's companion files: train.docs, val.targets, ...
TARGETS = ".targets"
SEGMENTS = ".segments"


def stable_hash(obj: object) -> str:
    """sha256 of a JSON-serialisable object, independent of dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class CacheMeta:
    """What a reader needs to trust and open a cache directory."""

    key: str
    name: str
    dtype: str
    vocab_size: int
    eos_id: int
    pad_id: int
    train_tokens: int
    val_tokens: int
    train_documents: int
    val_documents: int
    build_seconds: float
    format_version: int = CACHE_FORMAT_VERSION
    kind: str = "text"  # text: one stream of documents; chat: packed blocks of block_len tokens
    block_len: int = 0  # chat: seq_len + 1, the length of every stored block
    train_blocks: int = 0  # chat: blocks per split (text blocks are views of the stream)
    val_blocks: int = 0

    def save(self, directory: Path) -> None:
        (directory / META).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> CacheMeta:
        return cls(**json.loads((directory / META).read_text()))


def cache_root(cache_dir: str) -> Path:
    return Path(cache_dir).expanduser() / "data"


def is_complete(directory: Path) -> bool:
    """A published directory with a readable meta.json of this format version."""
    try:
        return CacheMeta.load(directory).format_version == CACHE_FORMAT_VERSION
    except (OSError, ValueError, TypeError, KeyError):
        return False


def scratch_dir(root: Path, key: str) -> Path:
    """A fresh private directory next to the final one (same filesystem, so rename is atomic)."""
    path = root / f".tmp-{key[:16]}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def publish(scratch: Path, final: Path) -> None:
    """Rename `scratch` to `final`; if another process published first, keep theirs."""
    try:
        os.rename(scratch, final)
    except OSError:
        if not is_complete(final):
            raise
        shutil.rmtree(scratch, ignore_errors=True)
