"""Sources: turn `data.sources` (and `data.builtin`) into record streams and cache keys.

A source is a file, a directory (read recursively, sorted, hidden files skipped), a glob, a
directory written by `datasets.save_to_disk`, or `datasets.load_dataset(builder,
data_files=...)`. Each resolved source reports a cheap identity (path, size, mtime) so that
the cache key changes when an input changes, without reading the data.
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List

from ava.config import DataConfig, SourceConfig
from ava.data import formats
from ava.data.errors import DataSourceError
from ava.data.validate import RawRecord

DATASET_DIR_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Source:
    """One readable unit: `records()` streams it, `identity` keys the cache."""

    name: str
    identity: dict
    records: Callable[[], Iterator[RawRecord]]


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in DATASET_DIR_MARKERS)


def _expand(pattern: str, where: str) -> List[Path]:
    """The files named by a path, directory or glob, sorted; datasets dirs stay whole."""
    path = Path(pattern).expanduser()
    if glob.has_magic(pattern):
        hits = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        if not hits:
            raise DataSourceError(f"{where}: the glob {pattern!r} matches no file")
    elif path.exists():
        hits = [path]
    else:
        raise DataSourceError(f"{where}: {str(path)!r} does not exist")
    files: List[Path] = []
    for hit in hits:
        if hit.is_dir() and not _is_dataset_dir(hit):
            files.extend(p for p in sorted(hit.rglob("*")) if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(hit).parts))
        else:
            files.append(hit)
    if not files:
        raise DataSourceError(f"{where}: {pattern!r} holds no file")
    return [f.resolve() for f in files]


CHAT_FORMATS = ("jsonl", "json", "parquet")  # formats whose records can hold a list of messages


def _file_source(path: Path, cfg: SourceConfig, data_cfg: DataConfig) -> Source:
    batch_size = data_cfg.batch_size
    chat = data_cfg.kind == "chat"
    sniff_field = data_cfg.chat.messages_field if chat else cfg.text_field
    fmt, compression = formats.detect_format(path, cfg.format, sniff_field, cfg.csv_delimiter)
    if chat:
        if fmt not in CHAT_FORMATS:
            raise DataSourceError(f"{path}: data.kind=chat reads {list(CHAT_FORMATS)} records, and this file is "
                                  f"{fmt}; convert it, or set data.sources[].format if it is misdetected")
        from ava.data.chat import record_maker

        make = record_maker(data_cfg.chat)
    else:
        make = formats.text_record(cfg.text_field)
    readers = {
        "txt": lambda: formats.read_txt(path, compression, cfg.txt_mode),
        "jsonl": lambda: formats.read_jsonl(path, compression, make),
        "json": lambda: formats.read_json(path, compression, make),
        "parquet": (lambda: formats.read_parquet_rows(path, compression, make, batch_size)) if chat else (
            lambda: formats.read_parquet(path, compression, cfg.text_field, batch_size)),
        "csv": lambda: formats.read_csv(path, compression, cfg.text_field, cfg.csv_delimiter),
        "arrow": lambda: formats.read_arrow(path, compression, cfg.text_field),
    }
    identity = {**_file_identity(path), "format": fmt, "compression": compression,
                "text_field": cfg.text_field, "txt_mode": cfg.txt_mode,
                "csv_delimiter": cfg.csv_delimiter, "kind": data_cfg.kind}
    return Source(name=f"{path} ({fmt}{'+' + compression if compression else ''})",
                  identity=identity, records=readers[fmt])


def _dataset_records(dataset: object, text_field: str, where: str,
                     batch_size: int) -> Iterator[RawRecord]:
    """Records of a `datasets.Dataset` (its Arrow batches, honouring any indices mapping)."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise DataSourceError(f"{where}: expected a datasets.Dataset, got "
                              f"{type(dataset).__name__}")
    formats.check_text_column(dataset.data.schema, text_field, where)
    batches = (batch for table in dataset.select_columns([text_field]).with_format("arrow")
               .iter(batch_size=batch_size) for batch in table.to_batches())
    yield from formats.table_records(batches, dataset.data.schema, text_field, where)


def _pick_split(loaded: object, split: str, where: str) -> object:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataSourceError(f"{where}: no split {split!r} (splits: {list(loaded)}); "
                                  "set data.sources[].split")
        return loaded[split]
    return loaded


def _disk_dataset_source(path: Path, cfg: SourceConfig, batch_size: int) -> Source:
    def records() -> Iterator[RawRecord]:
        import datasets

        loaded = _pick_split(datasets.load_from_disk(str(path)), cfg.split, str(path))
        yield from _dataset_records(loaded, cfg.text_field, str(path), batch_size)

    files = sorted(p for p in path.rglob("*") if p.is_file())
    identity = {"saved_dataset": str(path), "files": [_file_identity(p) for p in files],
                "split": cfg.split, "text_field": cfg.text_field}
    return Source(name=f"{path} (datasets save_to_disk)", identity=identity, records=records)


def _builder_source(cfg: SourceConfig, cache_dir: Path, batch_size: int, where: str) -> Source:
    # remote data files (hf://, https://) are passed through; local ones are expanded and keyed
    data_files = [f for pattern in cfg.data_files for f in (
        [pattern] if "://" in pattern else [str(p) for p in _expand(pattern, where)])]

    def records() -> Iterator[RawRecord]:
        import datasets

        try:
            loaded = datasets.load_dataset(cfg.builder, data_files=data_files or None,
                                           split=cfg.split, cache_dir=str(cache_dir))
        except Exception as exc:  # datasets raises many types; name the source
            raise DataSourceError(f"{where}: datasets.load_dataset({cfg.builder!r}) failed: "
                                  f"{exc}") from exc
        yield from _dataset_records(loaded, cfg.text_field, f"{cfg.builder}:{cfg.split}",
                                    batch_size)

    identity = {"builder": cfg.builder, "split": cfg.split, "text_field": cfg.text_field,
                "data_files": [f if "://" in f else _file_identity(Path(f))
                               for f in data_files]}
    return Source(name=f"datasets:{cfg.builder}[{cfg.split}]", identity=identity,
                  records=records)


def resolve_sources(data_cfg: DataConfig, hf_cache_dir: Path) -> List[Source]:
    """Every source of `data_cfg`, in a fixed order (built-in corpus first, then
    `data.sources` in config order, files sorted within each)."""
    from ava.data import builtin

    resolved: List[Source] = []
    if data_cfg.builtin:
        corpus = builtin.get(data_cfg.builtin, data_cfg.kind)
        identity = {"builtin": data_cfg.builtin, "version": corpus.version,
                    "python": sys.version, "implementation": sys.implementation.name}
        resolved.append(Source(name=f"builtin:{data_cfg.builtin}", identity=identity,
                               records=corpus.records))
    for index, cfg in enumerate(data_cfg.sources):
        where = f"data.sources[{index}]"
        text_only = f"{where}: data.kind=chat reads {list(CHAT_FORMATS)} files; `datasets` sources are text-only"
        if cfg.builder is not None:
            if data_cfg.kind == "chat":
                raise DataSourceError(text_only)
            resolved.append(_builder_source(cfg, hf_cache_dir, data_cfg.batch_size, where))
            continue
        assert cfg.path is not None
        for path in _expand(cfg.path, where):
            if _is_dataset_dir(path):
                if data_cfg.kind == "chat":
                    raise DataSourceError(text_only)
                resolved.append(_disk_dataset_source(path, cfg, data_cfg.batch_size))
            else:
                resolved.append(_file_source(path, cfg, data_cfg))
    return resolved


def check_sources(data_cfg: DataConfig) -> None:
    """Fail fast, reading nothing, when a source cannot exist: a missing path, a glob that matches
    no file, an empty directory, an unknown built-in corpus. Called before any process group is
    created, so a typo in a path ends the run with one line instead of a distributed failure."""
    from ava.data import builtin

    if data_cfg.builtin:
        builtin.get(data_cfg.builtin, data_cfg.kind)
    for index, cfg in enumerate(data_cfg.sources):
        where = f"data.sources[{index}]"
        if cfg.path is not None:
            _expand(cfg.path, where)
        for pattern in cfg.data_files:
            if "://" not in pattern:
                _expand(pattern, where)
