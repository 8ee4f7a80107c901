"""Every format, compressed or not, with or without a telling extension, yields the same
documents; detection picks the right reader; unknown formats fail with the supported list."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import List

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ava.config import SourceConfig
from ava.data.errors import DataSourceError
from ava.data.formats import detect_format
from ava.data.sources import resolve_sources
from ava.data.validate import TextValidator


@pytest.fixture
def read_all(tmp_path, data_config):
    """Texts of one source, read and validated in strict mode (so nothing is skipped)."""

    def read(**source) -> List[str]:
        return _read(data_config([SourceConfig(**source)]), tmp_path)

    return read


def _read(cfg, tmp_path: Path) -> List[str]:
    validator = TextValidator(max_doc_chars=cfg.max_doc_chars, strict=True, report_examples=3)
    texts = [t for s in resolve_sources(cfg, tmp_path / "hf") for t in validator(s.records())]
    assert validator.report.read == validator.report.kept == len(texts)
    return texts


def write_jsonl(path: Path, docs: List[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet(path: Path, docs: List[str]) -> Path:
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path)
    return path


def test_txt_paragraphs_and_file_mode(read_all, tmp_path, documents):
    (tmp_path / "a.txt").write_text("\n\n".join(documents[:30]) + "\n")
    # several blank lines (and whitespace-only lines) separate paragraphs just as well
    (tmp_path / "b.txt").write_text("\n \n\n".join(documents[30:]))
    assert read_all(path=str(tmp_path / "*.txt")) == documents

    multi = ["line one\nline two", "para a\n\npara b\n"]
    for i, doc in enumerate(multi):
        (tmp_path / f"f{i}.md").write_text(doc)
    assert read_all(path=str(tmp_path / "f*.md"), txt_mode="file") == multi


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "arrow_stream",
                                  "arrow_file", "saved_dataset", "builder_json"])
def test_each_format_round_trips(read_all, tmp_path, documents, kind):
    if kind == "jsonl":
        source = {"path": str(write_jsonl(tmp_path / "d.jsonl", documents))}
    elif kind == "json":
        (tmp_path / "d.json").write_text(json.dumps([{"text": d} for d in documents]))
        source = {"path": str(tmp_path / "d.json")}
    elif kind == "parquet":
        source = {"path": str(write_parquet(tmp_path / "d.parquet", documents))}
    elif kind == "csv":
        with (tmp_path / "d.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "text"])
            writer.writerows([i, d + "\nwith, a \"quoted\" newline"]
                             for i, d in enumerate(documents))
        documents = [d + "\nwith, a \"quoted\" newline" for d in documents]
        source = {"path": str(tmp_path / "d.csv")}
    elif kind in ("arrow_stream", "arrow_file"):
        table = pa.table({"text": documents})
        opener = pa.ipc.new_stream if kind == "arrow_stream" else pa.ipc.new_file
        with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, \
                opener(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=7)
        source = {"path": str(tmp_path / "d.arrow")}
    elif kind == "saved_dataset":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": documents}),
                              "test": datasets.Dataset.from_dict({"text": ["x"]})}
                             ).save_to_disk(str(tmp_path / "saved"))
        source = {"path": str(tmp_path / "saved"), "split": "train"}
    else:
        write_jsonl(tmp_path / "d.jsonl", documents)
        source = {"builder": "json", "data_files": [str(tmp_path / "d.jsonl")]}
    assert read_all(**source) == documents


def test_custom_text_field(read_all, tmp_path, documents):
    write_jsonl(tmp_path / "d.jsonl", documents, field="body")
    assert read_all(path=str(tmp_path / "d.jsonl"), text_field="body") == documents


def test_compressed_variants(read_all, tmp_path, documents):
    raw = "".join(json.dumps({"text": d}) + "\n" for d in documents).encode()
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(raw))
    with pa.output_stream(str(tmp_path / "d.jsonl.zst"), compression="zstd") as out:
        out.write(raw)
    (tmp_path / "p.txt.gz").write_bytes(gzip.compress("\n\n".join(documents).encode()))
    assert detect_format(tmp_path / "d.jsonl.gz") == ("jsonl", "gzip")
    assert detect_format(tmp_path / "d.jsonl.zst") == ("jsonl", "zstd")
    assert read_all(path=str(tmp_path / "d.jsonl.gz")) == documents
    assert read_all(path=str(tmp_path / "d.jsonl.zst")) == documents
    assert read_all(path=str(tmp_path / "p.txt.gz")) == documents


def test_sniffing_without_or_against_extension(read_all, tmp_path, documents):
    write_jsonl(tmp_path / "noext", documents)
    write_parquet(tmp_path / "table.bin", documents)
    write_jsonl(tmp_path / "really_jsonl.txt", documents)
    (tmp_path / "gz_no_suffix").write_bytes(gzip.compress((tmp_path / "noext").read_bytes()))
    (tmp_path / "plain").write_text("\n\n".join(documents))
    (tmp_path / "table_csv").write_text("id,text\n1,hello\n")
    assert detect_format(tmp_path / "noext") == ("jsonl", None)
    assert detect_format(tmp_path / "table.bin") == ("parquet", None)
    assert detect_format(tmp_path / "really_jsonl.txt") == ("jsonl", None)
    assert detect_format(tmp_path / "gz_no_suffix") == ("jsonl", "gzip")
    assert detect_format(tmp_path / "plain") == ("txt", None)
    assert detect_format(tmp_path / "table_csv") == ("csv", None)
    for name in ("noext", "table.bin", "really_jsonl.txt", "gz_no_suffix", "plain"):
        assert read_all(path=str(tmp_path / name)) == documents, name
    # a declared format wins over sniffing: the JSONL lines become plain-text paragraphs
    lines = read_all(path=str(tmp_path / "really_jsonl.txt"), format="txt")
    assert lines == ["\n".join(json.dumps({"text": d, "id": i})
                               for i, d in enumerate(documents))]


def test_directory_is_read_sorted_and_recursively(read_all, tmp_path, documents):
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    write_jsonl(root / "b" / "2.jsonl", documents[20:])
    write_jsonl(root / "1.jsonl", documents[:20])
    (root / ".hidden.bin").write_bytes(b"\x00\x01")  # hidden files are skipped
    assert read_all(path=str(root)) == documents


def test_unknown_and_missing_sources_are_clear_errors(read_all, tmp_path):
    (tmp_path / "blob.xyz").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataSourceError, match=r"blob\.xyz: unknown format.*parquet.*\.gz"):
        read_all(path=str(tmp_path / "blob.xyz"))
    with pytest.raises(DataSourceError, match=r"data\.sources\[0\].*nope\.jsonl.*not exist"):
        read_all(path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataSourceError, match="matches no file"):
        read_all(path=str(tmp_path / "*.none"))
    write_parquet(tmp_path / "d.parquet", ["a"])
    with pytest.raises(DataSourceError, match=r"d\.parquet: no column 'body'.*'text'"):
        read_all(path=str(tmp_path / "d.parquet"), text_field="body")
    (tmp_path / "fake.gz").write_text("not compressed")
    with pytest.raises(DataSourceError, match=r"fake\.gz.*gzip"):
        read_all(path=str(tmp_path / "fake.gz"))
