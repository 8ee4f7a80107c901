"""Packing: the cached stream is exactly the documents' tokens with EOS after each; blocks tile
it with a one-token overlap and never run past its end."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from ava.config import SourceConfig
from ava.data import prepare_data
from ava.data.packing import TokenBlocks, token_dtype
from ava.data.prepare import split_indices


@pytest.fixture
def prepared(tmp_path, data_config, documents):
    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "{d}"}}\n' for d in documents))
    cfg = data_config([SourceConfig(path=str(tmp_path / "d.jsonl"))], val_fraction=0.2,
                      num_proc=2)
    return prepare_data(cfg, model_vocab_size=512, seed=7, progress=False)


def test_stream_is_documents_plus_eos(prepared, documents):
    tokenizer = Tokenizer.from_file(str(prepared.tokenizer_path))
    train_idx, val_idx = split_indices(len(documents), 0.2, seed=7)
    assert len(val_idx) == 12 and not set(train_idx) & set(val_idx)
    for blocks, idx in ((prepared.train, train_idx), (prepared.val, val_idx)):
        expected = [t for i in idx for t in
                    [*tokenizer.encode(documents[i], add_special_tokens=False).ids,
                     prepared.eos_id]]
        assert blocks.tokens.dtype == np.uint16
        assert blocks.tokens.tolist() == expected
        assert tokenizer.decode(expected, skip_special_tokens=False) == "".join(
            documents[i] + "<|endoftext|>" for i in idx)


def test_blocks_tile_the_stream(prepared):
    for blocks in (prepared.train, prepared.val):
        seq_len, tokens = blocks.seq_len, np.asarray(blocks.tokens)
        n = len(blocks)
        assert n == (len(tokens) - 1) // seq_len > 0
        assert all(len(blocks[i]) == seq_len + 1 for i in range(n))
        # inputs of every block, then the last label, reproduce the stream up to the tail
        rebuilt = np.concatenate([blocks[i][:-1] for i in range(n)] + [blocks[n - 1][-1:]])
        assert np.array_equal(rebuilt, tokens[: n * seq_len + 1])
        assert len(tokens) - (n * seq_len + 1) < seq_len  # only a partial block is unused
        with pytest.raises(IndexError):
            blocks[n]


def test_token_blocks_on_a_handmade_stream(tmp_path):
    np.arange(23, dtype=np.uint32).tofile(tmp_path / "s.bin")
    blocks = TokenBlocks(tmp_path / "s.bin", np.dtype(np.uint32), seq_len=5, num_tokens=23)
    assert len(blocks) == 4
    assert blocks[3].tolist() == [15, 16, 17, 18, 19, 20]
    with pytest.raises(ValueError, match="22 uint32 tokens"):
        TokenBlocks(tmp_path / "s.bin", np.dtype(np.uint32), seq_len=5, num_tokens=22)


def test_dtype_follows_vocab_size():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
