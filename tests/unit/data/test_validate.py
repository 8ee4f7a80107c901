"""A corpus seeded with every kind of bad record: exact counts by reason, every good record
arrives, the counts add up, strict mode stops at the first bad record with file:line."""

from __future__ import annotations

import json

import pytest

from ava.config import SourceConfig
from ava.data import DataValidationError, prepare_data
from ava.data.sources import resolve_sources
from ava.data.validate import (
    EMPTY_TEXT,
    INVALID_UTF8,
    MALFORMED_JSON,
    MISSING_FIELD,
    NON_STRING_FIELD,
    SPLIT,
    TextValidator,
    split_text,
)

MAX_CHARS = 300


def seeded_corpus(tmp_path, good):
    """JSONL with the good documents interleaved with bad lines (and one blank line).
    Returns (path, line numbers of the bad records, line numbers of the good ones)."""
    bad = [
        b'{"text": "unterminated\n',  # malformed_json
        b"[1, 2, 3]\n",  # malformed_json: not an object
        b'{"body": "no text field"}\n',  # missing_field
        b'{"text": null}\n',  # missing_field
        b'{"text": 42}\n',  # non_string_field
        b'{"text": ["a", "b"]}\n',  # non_string_field
        b'{"text": ""}\n',  # empty_text
        b'{"text": "  \\n\\t "}\n',  # empty_text
        b'{"text": "caf\xe9 latin-1 byte"}\n',  # invalid_utf8
    ]
    lines, bad_lines, good_lines = [], [], []
    for i, doc in enumerate(good):
        lines.append(json.dumps({"text": doc}).encode() + b"\n")
        good_lines.append(len(lines))
        if i == 1:
            lines.append(b"\n")  # blank lines hold no record and are not counted
        if i < len(bad):
            lines.append(bad[i])
            bad_lines.append(len(lines))
    path = tmp_path / "seeded.jsonl"
    path.write_bytes(b"".join(lines))
    return path, bad_lines, good_lines


EXPECTED = {MALFORMED_JSON: 2, MISSING_FIELD: 2, NON_STRING_FIELD: 2, EMPTY_TEXT: 2,
            INVALID_UTF8: 1}


def test_counts_by_reason_are_exact(tmp_path, data_config, documents):
    long_doc = ("word " * 200).strip()  # 999 chars: split into 4 pieces of <= 300
    good = [*documents[:20], long_doc, *documents[20:]]
    path, bad_lines, good_lines = seeded_corpus(tmp_path, good)
    cfg = data_config([SourceConfig(path=str(path))], max_doc_chars=MAX_CHARS)
    validator = TextValidator(max_doc_chars=MAX_CHARS, strict=False, report_examples=1)
    texts = [t for s in resolve_sources(cfg, tmp_path) for t in validator(s.records())]
    report = validator.report

    assert report.skipped == EXPECTED
    assert report.read == len(good) + sum(EXPECTED.values())
    assert report.read == report.kept + report.total_skipped
    assert report.kept == len(good)
    assert (report.split_documents, report.split_pieces) == (1, 4)
    pieces = texts[20:24]
    assert "".join(pieces) == long_doc and all(len(p) <= MAX_CHARS for p in pieces)
    assert texts[:20] + texts[24:] == documents  # every good record arrives, in order
    assert report.documents == len(texts)
    # the first example of each reason is the first bad line of that kind
    assert report.examples[MALFORMED_JSON] == [f"{path}:{bad_lines[0]}"]
    assert report.examples[INVALID_UTF8] == [f"{path}:{bad_lines[8]}"]
    assert report.examples[SPLIT] == [f"{path}:{good_lines[20]}"]
    assert report.examples[EMPTY_TEXT] == [f"{path}:{bad_lines[6]}"]


def test_strict_mode_stops_at_first_bad_record(tmp_path, data_config, documents):
    path, bad_lines, _ = seeded_corpus(tmp_path, documents)
    cfg = data_config([SourceConfig(path=str(path))], strict=True)
    with pytest.raises(DataValidationError,
                       match=rf"seeded\.jsonl:{bad_lines[0]}: malformed_json"):
        prepare_data(cfg, model_vocab_size=512, progress=False)
    assert not list((tmp_path / "cache" / "data").glob("test-*"))  # nothing published


def test_report_is_saved_next_to_the_cache(tmp_path, data_config, documents):
    path, bad_lines, _ = seeded_corpus(tmp_path, documents)
    cfg = data_config([SourceConfig(path=str(path))], report_examples=2)
    prepared = prepare_data(cfg, model_vocab_size=512, progress=False)
    saved = json.loads((prepared.cache_path / "report.json").read_text())
    assert saved["skipped"] == EXPECTED == prepared.report.skipped
    assert saved["read"] == saved["kept"] + sum(saved["skipped"].values())
    assert saved["kept"] == len(documents)
    assert saved["examples"][MISSING_FIELD] == [f"{path}:{bad_lines[2]}",
                                                 f"{path}:{bad_lines[3]}"]
    assert prepared.report.lines()[0] == (f"records read {len(documents) + 9}, kept "
                                          f"{len(documents)}, skipped 9")


def test_other_formats_report_row_locations(tmp_path, data_config):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["good", None, "", "also good"]}), tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_bytes(b"text,n\nfine,1\nbad \xff byte,2\n,3\n")
    cfg = data_config([SourceConfig(path=str(tmp_path / "t.*"))])
    validator = TextValidator(max_doc_chars=100, strict=False, report_examples=5)
    texts = [t for s in resolve_sources(cfg, tmp_path) for t in validator(s.records())]
    assert texts == ["fine", "good", "also good"]
    assert validator.report.skipped == {EMPTY_TEXT: 2, INVALID_UTF8: 1, MISSING_FIELD: 1}
    assert validator.report.examples[INVALID_UTF8] == [f"{tmp_path / 't.csv'}:row 2"]
    assert validator.report.examples[MISSING_FIELD] == [f"{tmp_path / 't.parquet'}:row 2"]


def test_split_text_prefers_whitespace_and_loses_nothing():
    text = "alpha beta gamma delta " * 40 + "x" * 500
    pieces = split_text(text, 100)
    assert "".join(pieces) == text
    assert all(len(p) <= 100 for p in pieces)
    assert all(p.endswith(" ") for p in pieces[:9])  # cut after a space, not inside a word
