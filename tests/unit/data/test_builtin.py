"""The built-in `python_docs` corpus: deterministic across processes, MB-sized, real prose,
and usable as the default `data=` of the main job."""

from __future__ import annotations

import subprocess
import sys

from ava.config import compose, to_object
from ava.data import prepare_data
from ava.data.builtin import corpus_hash, python_docs_documents
from ava.data.python_docs import SKIP_MODULES

HASH_IN_FRESH_PROCESS = ("from ava.data.builtin import corpus_hash, python_docs_documents; "
                         "print(corpus_hash(python_docs_documents()))")


def test_python_docs_is_deterministic_and_non_trivial():
    docs = python_docs_documents()
    fresh = subprocess.run([sys.executable, "-c", HASH_IN_FRESH_PROCESS], check=True,
                           capture_output=True, text=True).stdout.strip()
    assert corpus_hash(docs) == fresh == corpus_hash(python_docs_documents())
    size = sum(len(text.encode()) for _, text in docs)
    assert 1_000_000 < size < 20_000_000
    locations = [loc for loc, _ in docs]
    assert len(set(locations)) == len(locations) > 1000
    assert {"python_docs:topic/for", "python_docs:module/json",
            "python_docs:class/json.decoder.JSONDecoder"} <= set(locations)
    assert not any(loc.split("/")[-1].split(".")[0] in SKIP_MODULES for loc in locations)
    text = "\n".join(t for _, t in docs)
    assert " at 0x" not in text  # no reprs with memory addresses
    assert "The \"for\" statement" in text


def test_default_data_config_prepares_python_docs(tmp_path):
    cfg = compose(["data=python_docs", f"data.cache_dir={tmp_path}", "data.seq_len=128",
                   "data.tokenizer.vocab_size=512"])
    data_cfg = to_object(cfg.data)
    prepared = prepare_data(data_cfg, model_vocab_size=512, seed=cfg.seed, progress=False)
    assert prepared.report.skipped == {}
    assert prepared.report.read == len(python_docs_documents())
    assert len(prepared.train) > 1000 and len(prepared.val) > 0
    assert prepared.vocab_size == 512
