"""File formats: detection (extension + content sniffing) and per-record readers.

The readers are ours rather than `datasets.load_dataset("json"/"text"/...)` because those stop
at the first bad line of a file, while validation needs every record with its `file:line`.
Binary and tabular formats are read with pyarrow (the engine under `datasets`); compressed
files (gzip, bz2, xz, zstd, lz4 frame) are decompressed by pyarrow's codecs, which need no
extra package.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import IO, Callable, Iterator, List, Optional, Tuple

import pyarrow as pa

from ava.data.errors import DataSourceError
from ava.data.validate import (
    INVALID_UTF8,
    MALFORMED_JSON,
    MISSING_FIELD,
    NON_STRING_FIELD,
    RawRecord,
)

FORMATS = ("txt", "jsonl", "json", "parquet", "csv", "arrow")
EXTENSIONS = {".txt": "txt", ".text": "txt", ".md": "txt", ".rst": "txt",
              ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
              ".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
              ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
# Magic numbers name the codec; pyarrow's codec names are the values.
COMPRESSION_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"),
                     (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4"))
COMPRESSION_SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".xz": "xz",
                        ".zst": "zstd", ".zstd": "zstd", ".lz4": "lz4"}
SNIFF_BYTES = 64 * 1024  # enough for a first JSON line or a CSV header


def supported_formats() -> str:
    """Human-readable list of what is supported, for error messages."""
    exts = ", ".join(sorted(EXTENSIONS))
    comps = ", ".join(sorted(COMPRESSION_SUFFIXES))
    return (f"formats {list(FORMATS)} (extensions {exts}), optionally compressed ({comps}), "
            "and `datasets` directories written by save_to_disk")


def _compression_of(head: bytes) -> Optional[str]:
    for magic, codec in COMPRESSION_MAGIC:
        if head.startswith(magic):
            return codec
    return None


def open_binary(path: Path, compression: Optional[str]) -> IO[bytes]:
    """A buffered binary stream of the decompressed content."""
    try:
        stream = pa.input_stream(str(path), compression=compression)
    except (OSError, pa.ArrowException) as exc:
        raise DataSourceError(f"{path}: cannot open ({exc})") from exc
    return io.BufferedReader(stream)  # type: ignore[arg-type]


def _sniff_content(head: bytes, text_field: str, delimiter: str) -> Tuple[Optional[str], bool]:
    """(format, proven) from the first decompressed bytes. `proven` means the content can
    only be that format (a magic number, or a first line that is a JSON object holding the
    text field), so it overrides a misleading extension."""
    if head.startswith(b"PAR1"):
        return "parquet", True
    if head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
        return "arrow", True
    if b"\x00" in head:
        return None, False
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    stripped = text.lstrip()
    first_line = stripped.split("\n", 1)[0].strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(first_line)
        except json.JSONDecodeError:
            return "jsonl", False
        return "jsonl", isinstance(obj, dict) and text_field in obj
    if stripped.startswith("["):
        return "json", False
    header = next(csv.reader([first_line], delimiter=delimiter), [])
    if len(header) > 1 and text_field in header:
        return "csv", False
    return "txt", False


def detect_format(path: Path, declared: str = "auto", text_field: str = "text",
                  delimiter: str = ",") -> Tuple[str, Optional[str]]:
    """(format, compression) of a file. Compression comes from magic bytes. The format is the
    declared one if not `auto`; else content that proves a format; else the extension; else
    the content's best guess; else a `DataSourceError` listing what is supported."""
    with path.open("rb") as raw:
        head = raw.read(SNIFF_BYTES)
    compression = _compression_of(head)
    name = path.name.lower()
    suffix = Path(name).suffix
    if suffix in COMPRESSION_SUFFIXES:
        name = name[: -len(suffix)]
        if compression is None:
            raise DataSourceError(f"{path}: the name says {COMPRESSION_SUFFIXES[suffix]} "
                                  "but the content is not compressed that way")
    if compression is not None:
        with open_binary(path, compression) as stream:
            head = stream.read(SNIFF_BYTES)
    if declared != "auto":
        return declared, compression
    sniffed, proven = _sniff_content(head, text_field, delimiter)
    by_extension = EXTENSIONS.get(Path(name).suffix)
    fmt = sniffed if proven else (by_extension or sniffed)
    if fmt is None:
        raise DataSourceError(f"{path}: unknown format (binary content and no known "
                              f"extension). Supported: {supported_formats()}; or set "
                              "data.sources[].format explicitly")
    return fmt, compression


# --------------------------------------------------------------------------- readers


def _decode(raw: bytes, location: str) -> Tuple[Optional[str], Optional[RawRecord]]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, RawRecord(location, reason=INVALID_UTF8,
                               detail=f"invalid UTF-8 byte at offset {exc.start}")


def read_txt(path: Path, compression: Optional[str], mode: str) -> Iterator[RawRecord]:
    """`paragraph`: documents are blocks separated by blank lines (location = first line);
    `file`: the whole file is one document."""
    with open_binary(path, compression) as stream:
        if mode == "file":
            text, bad = _decode(stream.read(), f"{path}:1")
            yield bad or RawRecord(f"{path}:1", text=text)
            return
        block: List[bytes] = []
        first = 0
        for number, line in enumerate(stream, start=1):
            if line.strip():
                if not block:
                    first = number
                block.append(line)
                continue
            if block:
                yield _paragraph(block, f"{path}:{first}")
                block = []
        if block:
            yield _paragraph(block, f"{path}:{first}")


def _paragraph(block: List[bytes], location: str) -> RawRecord:
    raw = b"".join(block)
    raw = raw[:-2] if raw.endswith(b"\r\n") else raw.rstrip(b"\n")
    text, bad = _decode(raw, location)
    return bad or RawRecord(location, text=text)


RecordMaker = Callable[[object, str], RawRecord]  # (parsed object, location) -> record


def text_record(text_field: str) -> RecordMaker:
    return lambda obj, location: _from_object(obj, text_field, location)


def _from_object(obj: object, text_field: str, location: str) -> RawRecord:
    if not isinstance(obj, dict):
        return RawRecord(location, reason=MALFORMED_JSON,
                         detail=f"expected a JSON object, got {type(obj).__name__}")
    value = obj.get(text_field)
    if value is None:
        return RawRecord(location, reason=MISSING_FIELD,
                         detail=f"no field {text_field!r} (or it is null)")
    if not isinstance(value, str):
        return RawRecord(location, reason=NON_STRING_FIELD,
                         detail=f"field {text_field!r} is a {type(value).__name__}, not a string")
    return RawRecord(location, text=value)


def read_jsonl(path: Path, compression: Optional[str], make: RecordMaker) -> Iterator[RawRecord]:
    """One JSON object per line; blank lines carry no record and are not counted."""
    with open_binary(path, compression) as stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            location = f"{path}:{number}"
            line, bad = _decode(raw, location)
            if bad is not None:
                yield bad
                continue
            try:
                obj = json.loads(line)  # type: ignore[arg-type]
            except json.JSONDecodeError as exc:
                yield RawRecord(location, reason=MALFORMED_JSON, detail=exc.msg)
                continue
            yield make(obj, location)


def read_json(path: Path, compression: Optional[str], make: RecordMaker) -> Iterator[RawRecord]:
    """A JSON array of objects (location = row), or JSON Lines saved as `.json`."""
    with open_binary(path, compression) as stream:
        head = stream.read(SNIFF_BYTES).lstrip()
    if not head.startswith(b"["):
        yield from read_jsonl(path, compression, make)
        return
    with open_binary(path, compression) as stream:
        raw = stream.read()
    text, bad = _decode(raw, f"{path}:1")
    if bad is not None:
        yield bad
        return
    try:
        items = json.loads(text)  # type: ignore[arg-type]
    except json.JSONDecodeError as exc:  # the whole array is one unreadable record
        yield RawRecord(f"{path}:{exc.lineno}", reason=MALFORMED_JSON, detail=exc.msg)
        return
    for number, obj in enumerate(items, start=1):
        yield make(obj, f"{path}:row {number}")


def _column_records(column: pa.Array, first_row: int, where: str) -> Iterator[RawRecord]:
    """Records of one text column chunk (string or binary); rows count from 1."""
    is_binary = pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)
    for offset, value in enumerate(column.to_pylist()):
        location = f"{where}:row {first_row + offset}"
        if value is None:
            yield RawRecord(location, reason=MISSING_FIELD, detail="the text cell is null")
        elif is_binary:
            text, bad = _decode(value, location)
            yield bad or RawRecord(location, text=text)
        else:
            yield RawRecord(location, text=value)


def check_text_column(schema: pa.Schema, text_field: str, where: str) -> None:
    """A table without a usable text column is a setup error, not a per-row problem."""
    if text_field not in schema.names:
        raise DataSourceError(f"{where}: no column {text_field!r} (columns: {schema.names}); "
                              "set data.sources[].text_field")
    kind = schema.field(text_field).type
    if not any(check(kind) for check in (pa.types.is_string, pa.types.is_large_string,
                                         pa.types.is_binary, pa.types.is_large_binary)):
        raise DataSourceError(f"{where}: column {text_field!r} has type {kind}, not text")


def table_records(batches: Iterator[pa.RecordBatch], schema: pa.Schema, text_field: str,
                  where: str) -> Iterator[RawRecord]:
    """Records of a stream of Arrow record batches (parquet, arrow, csv, datasets)."""
    check_text_column(schema, text_field, where)
    row = 1
    for batch in batches:
        column = batch.column(batch.schema.get_field_index(text_field))
        yield from _column_records(column, row, where)
        row += batch.num_rows


def _seekable(path: Path, compression: Optional[str]) -> pa.NativeFile:
    if compression is None:
        return pa.memory_map(str(path))
    with open_binary(path, compression) as stream:
        return pa.BufferReader(stream.read())


def _parquet_file(path: Path, compression: Optional[str]):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(_seekable(path, compression))
    except pa.ArrowException as exc:
        raise DataSourceError(f"{path}: not a readable parquet file ({exc})") from exc


def read_parquet(path: Path, compression: Optional[str], text_field: str,
                 batch_size: int) -> Iterator[RawRecord]:
    reader = _parquet_file(path, compression)
    schema = reader.schema_arrow
    check_text_column(schema, text_field, str(path))
    yield from table_records(reader.iter_batches(batch_size=batch_size, columns=[text_field]),
                             schema, text_field, str(path))


def read_parquet_rows(path: Path, compression: Optional[str], make: RecordMaker,
                      batch_size: int) -> Iterator[RawRecord]:
    """Whole rows as objects (a conversation is a list of structs, not a text column)."""
    row = 1
    for batch in _parquet_file(path, compression).iter_batches(batch_size=batch_size):
        for obj in batch.to_pylist():
            yield make(obj, f"{path}:row {row}")
            row += 1


def read_arrow(path: Path, compression: Optional[str], text_field: str) -> Iterator[RawRecord]:
    """Arrow IPC, stream format (what `datasets` writes) or file format."""
    source = _seekable(path, compression)
    try:
        reader = pa.ipc.open_stream(source)
        batches: Iterator[pa.RecordBatch] = iter(reader)
    except pa.ArrowInvalid:
        try:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
        except pa.ArrowException as exc:
            raise DataSourceError(f"{path}: not a readable Arrow IPC file ({exc})") from exc
        reader = file_reader
        batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
    yield from table_records(batches, reader.schema, text_field, str(path))


def read_csv(path: Path, compression: Optional[str], text_field: str,
             delimiter: str) -> Iterator[RawRecord]:
    """CSV with a header row; the text column is read as bytes so that one row with invalid
    UTF-8 is skipped on its own instead of failing the file."""
    import pyarrow.csv as pcsv

    stream = pa.input_stream(str(path), compression=compression)
    try:
        reader = pcsv.open_csv(
            stream,
            parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(column_types={text_field: pa.binary()},
                                                strings_can_be_null=False))
    except pa.ArrowException as exc:
        raise DataSourceError(f"{path}: not a readable CSV file ({exc})") from exc
    try:
        yield from table_records(iter(reader), reader.schema, text_field, str(path))
    except pa.ArrowException as exc:
        raise DataSourceError(f"{path}: CSV parse error ({exc})") from exc
