"""Byte-level BPE round-trips any text; the model/tokenizer vocab agreement rule."""

from __future__ import annotations

import pytest

from ava.config import SourceConfig, TokenizerConfig
from ava.data import TokenizerMismatchError, prepare_data
from ava.data import tokenizer as tok


def test_trained_tokenizer_round_trips_text(documents):
    cfg = TokenizerConfig(vocab_size=320)
    trained = tok.train_tokenizer([documents], cfg=cfg, vocab_size=320)
    assert tok.vocab_size_of(trained) == 320
    assert trained.token_to_id("<|endoftext|>") == 0 and trained.token_to_id("<|pad|>") == 1
    samples = [*documents[:5], "  leading and trailing spaces  ", "tabs\tand\r\nCRLF\n\n\n",
               "unseen: Ωμέγα 🚀 \u200b zero-width, ﬁ ligature, e\u0301 combining",
               "ＦＵＬＬＷＩＤＴＨ and NFKC-sensitive ½", ""]
    for text in samples:
        ids = trained.encode(text, add_special_tokens=False).ids
        assert trained.decode(ids, skip_special_tokens=False) == text
    # merges were learned: the corpus compresses below one token per byte
    joined = " ".join(documents)
    assert len(trained.encode(joined).ids) < 0.6 * len(joined.encode())


def test_requested_vocab_larger_than_model_names_both_numbers():
    with pytest.raises(TokenizerMismatchError, match=r"1024 ids.*512 rows.*model\.vocab_size"
                       r".*data\.tokenizer\.vocab_size"):
        tok.target_vocab_size(TokenizerConfig(vocab_size=1024), model_vocab_size=512)
    assert tok.target_vocab_size(TokenizerConfig(), model_vocab_size=512) == 512


def test_loaded_tokenizer_larger_than_model_fails_smaller_is_noted(tmp_path, data_config,
                                                                    documents):
    trained = tok.train_tokenizer([documents], cfg=TokenizerConfig(), vocab_size=400)
    path = tmp_path / "tok.json"
    trained.save(str(path))
    (tmp_path / "d.txt").write_text("\n\n".join(documents))
    cfg = data_config([SourceConfig(path=str(tmp_path / "d.txt"))],
                      tokenizer=TokenizerConfig(path=str(path)))
    with pytest.raises(TokenizerMismatchError, match=r"400 ids.*300 rows"):
        prepare_data(cfg, model_vocab_size=300, progress=False)
    assert tok.check_agreement(400, 512) == ("tokenizer has 400 ids, model.vocab_size=512: "
                                             "112 embedding rows are unused")
    assert tok.check_agreement(512, 512) is None
    prepared = prepare_data(cfg, model_vocab_size=512, progress=False)
    assert prepared.vocab_size == 400
    assert prepared.tokenizer_path.read_text() == path.read_text()


def test_bpe_running_out_of_merges_is_accepted(tmp_path, data_config):
    (tmp_path / "tiny.txt").write_text("ab ab ab\n\nab ab ab ab\n\nba ba")
    cfg = data_config([SourceConfig(path=str(tmp_path / "tiny.txt"))],
                      tokenizer=TokenizerConfig(vocab_size=500), val_fraction=0.0, seq_len=2)
    prepared = prepare_data(cfg, model_vocab_size=512, progress=False)
    assert 258 <= prepared.vocab_size < 300  # 256 bytes + 2 specials + a few merges
