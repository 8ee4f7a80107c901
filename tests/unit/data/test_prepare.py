"""prepare_data: cache reuse and invalidation, atomic publication, fingerprints, and the
torch.distributed code path (one gloo rank in process; two ranks as two nodes with node-local
caches, in subprocesses)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import numpy as np
import pytest

from ava.config import SourceConfig
from ava.data import BlockLoader, DataError, DataValidationError, builtin, prepare_data
from ava.data import prepare as prepare_module
from ava.data.builtin import BuiltinCorpus
from ava.train.distributed import free_port


@pytest.fixture
def corpus(tmp_path, documents):
    path = tmp_path / "d.txt"
    path.write_text("\n\n".join(documents))
    return path


def test_second_call_reuses_the_cache(corpus, data_config, monkeypatch):
    cfg = data_config([SourceConfig(path=str(corpus))])
    first = prepare_data(cfg, model_vocab_size=512, progress=False)

    def no_build(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(prepare_module, "_build", no_build)
    second = prepare_data(cfg, model_vocab_size=512, progress=False)
    assert second.cache_path == first.cache_path and second.fingerprint == first.fingerprint
    assert np.array_equal(second.train.tokens, first.train.tokens)
    assert second.report.to_dict() == first.report.to_dict()
    # seq_len only changes the view: same cache, different fingerprint (resume must refuse)
    cfg.seq_len = 8
    third = prepare_data(cfg, model_vocab_size=512, progress=False)
    assert third.cache_path == first.cache_path and third.fingerprint != first.fingerprint
    assert len(third.train) == (third.train.num_tokens - 1) // 8


def test_changed_inputs_rebuild(corpus, data_config):
    cfg = data_config([SourceConfig(path=str(corpus))])
    base = prepare_data(cfg, model_vocab_size=512, progress=False)
    other_seed = prepare_data(cfg, model_vocab_size=512, seed=99, progress=False)
    assert other_seed.cache_path != base.cache_path
    corpus.write_text(corpus.read_text() + "\n\nOne more document.")
    os.utime(corpus, ns=(0, corpus.stat().st_mtime_ns + 10**9))
    edited = prepare_data(cfg, model_vocab_size=512, progress=False)
    assert edited.cache_path != base.cache_path and edited.fingerprint != base.fingerprint
    assert edited.report.read == base.report.read + 1


def test_interrupted_preparation_is_never_reused(corpus, data_config, monkeypatch):
    cfg = data_config([SourceConfig(path=str(corpus))])
    calls = []

    def crash(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_stream", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, model_vocab_size=512, progress=False)
    data_root = Path(cfg.cache_dir) / "data"
    assert calls and [p.name for p in data_root.iterdir()] == []  # scratch removed too
    # a hard kill leaves a scratch directory behind: it is ignored
    (data_root / ".tmp-leftover").mkdir()
    monkeypatch.undo()
    prepared = prepare_data(cfg, model_vocab_size=512, progress=False)
    assert (prepared.cache_path / "meta.json").is_file() and len(prepared.train) > 0


def test_no_surviving_document_is_a_clear_error(tmp_path, data_config):
    (tmp_path / "bad.jsonl").write_text('{"text": ""}\n{"oops": 1}\n')
    cfg = data_config([SourceConfig(path=str(tmp_path / "bad.jsonl"))])
    with pytest.raises(DataError, match=r"no document survived.*read 2, kept 0"):
        prepare_data(cfg, model_vocab_size=512, progress=False)


def test_single_rank_process_group(corpus, data_config, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        cfg = data_config([SourceConfig(path=str(corpus))])
        prepared = prepare_data(cfg, model_vocab_size=512, progress=False)
        batch = next(BlockLoader(prepared.train, micro_batch_size=2, seed=0))
        assert batch["input_ids"].shape == (2, cfg.seq_len)
        with pytest.raises(DataError, match="does not exist"):
            prepare_data(data_config([SourceConfig(path=str(tmp_path / "missing"))]),
                         model_vocab_size=512, progress=False)
    finally:
        dist.destroy_process_group()


def test_strict_holds_when_a_non_strict_run_cached_the_data(tmp_path, data_config, documents):
    """The cache is shared by strict and non-strict runs; a strict run that finds bad records
    counted in the cached report stops with the exact message a fresh strict run gives."""
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": d}) for d in documents]
    lines[4] = '{"text": "unterminated'
    path.write_text("\n".join(lines) + "\n")
    relaxed = prepare_data(data_config([SourceConfig(path=str(path))]), model_vocab_size=512, progress=False)
    assert relaxed.report.skipped == {"malformed_json": 1}
    with pytest.raises(DataValidationError) as fresh:  # no cache: the validator stops at line 5
        prepare_data(data_config([SourceConfig(path=str(path))], strict=True,
                                 cache_dir=str(tmp_path / "other")), model_vocab_size=512, progress=False)
    with pytest.raises(DataValidationError) as cached:
        prepare_data(data_config([SourceConfig(path=str(path))], strict=True), model_vocab_size=512,
                     progress=False)
    assert str(cached.value) == str(fresh.value)
    assert str(fresh.value).startswith(f"{path}:5: malformed_json: ")


def test_preparation_names_its_sources_and_warns_when_the_builtin_corpus_joins(
        tmp_path, corpus, data_config, monkeypatch, caplog):
    tiny = BuiltinCorpus("tiny_test", "1", lambda: [(f"tiny:{i}", f"Built-in document {i}.") for i in range(30)])
    monkeypatch.setitem(builtin.CORPORA, "tiny_test", tiny)
    cfg = data_config([SourceConfig(path=str(corpus))], builtin="tiny_test")
    with caplog.at_level(logging.INFO, logger="ava.data"):
        prepared = prepare_data(cfg, model_vocab_size=512, progress=False)
    assert f"data: 2 source(s): builtin:tiny_test, {corpus} (txt)" in caplog.text
    assert ("the built-in corpus 'tiny_test' is used as well as data.sources (data.builtin=tiny_test); "
            "to train on your files only, use data=files") in caplog.text
    assert prepared.report.read == 30 + len(corpus.read_text().split("\n\n"))
    # the validation report reaches the log (and so a run's train.log), not only a console
    assert f"data validation: records read {prepared.report.read}, kept {prepared.report.kept}" in caplog.text


NODE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from ava.config import DataConfig, SourceConfig, TokenizerConfig
    from ava.data import DataError, prepare_data

    rank, port, cache_dir, source = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = DataConfig(name="nodes", sources=[SourceConfig(path=source)], seq_len=16, val_fraction=0.1,
                     cache_dir=cache_dir, tokenizer=TokenizerConfig(vocab_size=384), batch_size=16)
    try:
        prepared = prepare_data(cfg, model_vocab_size=512, progress=False)
        print(json.dumps({"cache": str(prepared.cache_path), "tokens": prepared.train.tokens.tolist()}))
    except DataError as exc:
        print(json.dumps({"error": str(exc)}))
    dist.destroy_process_group()
""")


def two_nodes(tmp_path: Path, sources: List[Path]) -> List[dict]:
    """Two gloo ranks as two nodes (LOCAL_RANK 0 on both, as each node's first process), each with
    its own data.cache_dir (a node-local disk) and source path; their prepare_data results."""
    port = str(free_port())
    env = {**os.environ, "LOCAL_RANK": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, str(rank), port, str(tmp_path / f"node{rank}"),
                               str(sources[rank])], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def test_node_local_caches_are_built_per_node_and_agree(corpus, tmp_path):
    same = two_nodes(tmp_path, [corpus, corpus])
    assert [Path(r["cache"]).parents[1] for r in same] == [tmp_path / "node0", tmp_path / "node1"]
    assert Path(same[0]["cache"]).name == Path(same[1]["cache"]).name
    assert same[0]["tokens"] == same[1]["tokens"]  # the second node's own build is the same cache

    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text() + "\n\nA document only the second node has.")
    differ = two_nodes(tmp_path / "differ", [corpus, other])
    assert differ[0] == differ[1]  # both ranks stop, with the same message
    assert differ[0]["error"].startswith("rank 1 could not prepare its node's data cache: it prepared ")
    assert differ[0]["error"].endswith(": the sources differ between nodes")
