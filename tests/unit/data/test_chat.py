"""Chat data: the template renders as transformers renders it, exactly the assistant tokens are
targets, bad conversations are counted by reason, conversations are packed whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import pytest

from ava.config import IGNORE_INDEX, ChatConfig, SourceConfig, TokenizerConfig
from ava.data import BlockLoader, DataSourceError, DataValidationError, prepare_data
from ava.data.chat import ChatTemplate, load_template
from ava.data.packing import pack_conversations
from ava.data.tokenizer import train_tokenizer

SPECIAL = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
# A template in transformers' format (a default system prompt, whitespace control, trim, an
# exception), so equality with apply_chat_template also checks the environment's settings.
TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = 'You are helpful.' %}"
    "{%- set loop_messages = messages %}{%- endif %}\n"
    "{{ bos_token }}<|im_start|>system\n{{ system }}<|im_end|>\n"
    "{% for message in loop_messages %}\n"
    "{%- if message['role'] == 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}\n"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MULTI_TURN = [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": "What is an expert?"},
              {"role": "assistant", "content": "A feed-forward block the router picks."},
              {"role": "user", "content": "And top-k?"},
              {"role": "assistant", "content": "  The k best experts per token. "}]


@pytest.fixture
def tokenizer_dir(tmp_path: Path, make_documents) -> Path:
    """A tokenizer directory as transformers saves one: tokenizer.json + tokenizer_config.json."""
    root = tmp_path / "tok"
    root.mkdir()
    texts = make_documents(80) + [m["content"] for m in MULTI_TURN]
    tok = train_tokenizer([texts], cfg=TokenizerConfig(special_tokens=SPECIAL), vocab_size=400)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
        "chat_template": TEMPLATE}))
    return root


def chat_config(data_config, tokenizer_dir: Path, path: Path, **overrides):
    tokenizer = TokenizerConfig(path=str(tokenizer_dir / "tokenizer.json"), special_tokens=SPECIAL,
                                eos_token="<|im_end|>", pad_token="<|pad|>")
    return data_config([SourceConfig(path=str(path))], kind="chat", tokenizer=tokenizer, **overrides)


def write_jsonl(path: Path, records: List[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_rendering_equals_transformers_apply_chat_template(tokenizer_dir, data_config, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ours = load_template(chat_config(data_config, tokenizer_dir, write_jsonl(tmp_path / "x.jsonl", [])))
    assert ours.origin == str(tokenizer_dir / "tokenizer_config.json")
    for messages in (MULTI_TURN, MULTI_TURN[1:3], MULTI_TURN[1:2]):
        for generation in (False, True):
            assert ours.render(messages, generation) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation)


def test_exactly_the_assistant_tokens_are_targets(tokenizer_dir, data_config, tmp_path):
    """Multi-turn with a system prompt, and a prompt/completion pair: the target tokens decode to
    the assistant spans the template renders, in order, and nothing else is a target."""
    from tokenizers import Tokenizer

    records = [{"messages": MULTI_TURN}, {"prompt": "Name a router.", "completion": "Sinkhorn."}]
    cfg = chat_config(data_config, tokenizer_dir, write_jsonl(tmp_path / "c.jsonl", records * 3),
                      seq_len=256, val_fraction=0.0)
    prepared = prepare_data(cfg, model_vocab_size=512, progress=False)
    tok = Tokenizer.from_file(str(prepared.tokenizer_path))
    runs = []
    for i in range(len(prepared.train)):
        current: List[int] = []
        for token, flag in zip(prepared.train[i].tolist(), prepared.train.targets(i).tolist(), strict=True):
            if flag:
                current.append(token)
            elif current:
                runs.append(tok.decode(current, skip_special_tokens=False))
                current = []
    expected = ["A feed-forward block the router picks.<|im_end|>\n", "The k best experts per token.<|im_end|>\n",
                "Sinkhorn.<|im_end|>\n"]
    assert runs == expected * 3
    block, targets = prepared.train[0], prepared.train.targets(0)
    loader = BlockLoader(prepared.train, micro_batch_size=1, shuffle=False)
    batch = next(loader)
    labels = batch["labels"][0]
    assert (labels != IGNORE_INDEX).sum() == targets[1:].sum()
    assert (labels[targets[1:]] == batch["input_ids"][0].new_tensor(block[1:])[targets[1:]]).all()


BAD = [
    "{not json",  # malformed_json
    {"text": "no conversation here"},  # missing_messages
    {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "boo"}]},  # unknown_role
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "   "}]},  # empty_assistant
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},  # no_assistant
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]},  # malformed_message
    {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"},
                  {"role": "assistant", "content": "ok"}]},  # template_error (the template raises)
]


def test_every_kind_of_bad_conversation_is_counted(tokenizer_dir, data_config, tmp_path):
    good = {"messages": MULTI_TURN[1:3]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, *BAD, good, BAD[2]])
    prepared = prepare_data(chat_config(data_config, tokenizer_dir, path, seq_len=256), model_vocab_size=512,
                            progress=False)
    report = prepared.report
    assert report.skipped == {"empty_assistant": 1, "malformed_json": 1, "malformed_message": 1,
                              "missing_messages": 1, "no_assistant": 1, "template_error": 1, "unknown_role": 2}
    assert report.read == 10 and report.kept == 2 and report.read == report.kept + report.total_skipped
    assert report.examples["unknown_role"] == [f"{path}:4", f"{path}:10"]
    assert report.first_skip["location"] == f"{path}:2" and report.first_skip["reason"] == "malformed_json"


def test_strict_names_file_line_and_reason(tokenizer_dir, data_config, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": MULTI_TURN[1:3]}, BAD[4]])
    with pytest.raises(DataValidationError, match=rf"{path}:2: no_assistant: the conversation has no assistant"):
        prepare_data(chat_config(data_config, tokenizer_dir, path, strict=True), model_vocab_size=512,
                     progress=False)


def test_overlong_conversations_are_truncated_or_dropped_and_counted(tokenizer_dir, data_config, tmp_path):
    long = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "the model reads tokens " * 80}]}
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": MULTI_TURN[1:3]}, long])
    cut = prepare_data(chat_config(data_config, tokenizer_dir, path, seq_len=128, val_fraction=0.0),
                       model_vocab_size=512, progress=False)
    assert cut.report.truncated == 1 and cut.report.kept == 2 and len(cut.train) == 2
    dropped = prepare_data(chat_config(data_config, tokenizer_dir, path, seq_len=128, val_fraction=0.0,
                                       chat=ChatConfig(overlong="drop")), model_vocab_size=512, progress=False)
    assert dropped.report.skipped == {"too_long": 1} and dropped.report.kept == 1 and len(dropped.train) == 1
    assert dropped.report.examples["too_long"] == [f"{path}:2"]


def test_packing_keeps_conversations_whole():
    rows = [(f"f:{i}", list(range(1, n + 1)), [False] + [True] * (n - 1)) for i, n in enumerate((5, 4, 3, 9))]
    blocks = list(pack_conversations(iter(rows), 10, 0, "truncate", lambda loc: None, lambda loc, d: None))
    assert [used for *_, used in blocks] == [9, 3, 9]
    ids, targets, segments, _ = blocks[0]
    assert ids.tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 4, 0] and segments.tolist() == [0] * 5 + [1] * 4 + [2]
    assert not targets[9] and not targets[0] and not targets[5]


def test_chat_refuses_text_sources_and_text_corpora(tokenizer_dir, data_config, tmp_path):
    (tmp_path / "plain.txt").write_text("just prose\n")
    cfg = chat_config(data_config, tokenizer_dir, tmp_path / "plain.txt")
    with pytest.raises(DataSourceError, match=r"plain.txt: data.kind=chat reads \['jsonl', 'json', 'parquet'\]"):
        prepare_data(cfg, model_vocab_size=512, progress=False)
    with pytest.raises(DataSourceError, match=r"data.builtin='python_docs' holds text records but data.kind=chat"):
        prepare_data(data_config([], kind="chat", builtin="python_docs"), model_vocab_size=512, progress=False)


def test_template_that_rewrites_earlier_turns_is_refused_per_record():
    # drops every assistant turn but the last, as reasoning templates drop earlier thinking
    rewriting = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                 "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}")
    template = ChatTemplate(rewriting, "test", {})
    with pytest.raises(ValueError, match="does not render the conversation up to message 3 as a prefix"):
        template.segments(MULTI_TURN, "assistant")
    assert template.segments(MULTI_TURN, "all") == [(template.render(MULTI_TURN), True)]


def test_text_blocks_number_their_documents(data_config, tmp_path):
    (tmp_path / "a.txt").write_text("one two three\n\nfour five\n\nsix seven eight nine\n")
    prepared = prepare_data(data_config([SourceConfig(path=str(tmp_path / "a.txt"))], seq_len=4, val_fraction=0.0),
                            model_vocab_size=512, progress=False)
    eos = prepared.eos_id
    stream = np.asarray(prepared.train.tokens)
    for i in range(len(prepared.train)):
        block, segments = prepared.train[i], prepared.train.segments(i)
        after_eos = np.concatenate([[0], (block[:-1] == eos).cumsum()])  # a document ends with its EOS
        assert segments.tolist() == after_eos.tolist(), (i, stream.tolist())


def test_parquet_conversations_read_as_jsonl_ones(tokenizer_dir, data_config, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"messages": MULTI_TURN}, {"messages": BAD[3]["messages"]}, {"messages": MULTI_TURN[1:3]}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    write_jsonl(tmp_path / "c.jsonl", records)
    prepared = {ext: prepare_data(chat_config(data_config, tokenizer_dir, tmp_path / f"c.{ext}", seq_len=256,
                                              val_fraction=0.0), model_vocab_size=512, progress=False)
                for ext in ("parquet", "jsonl")}
    assert prepared["parquet"].report.skipped == {"empty_assistant": 1}
    assert prepared["parquet"].report.examples["empty_assistant"] == [f"{tmp_path / 'c.parquet'}:row 2"]
    assert np.array_equal(prepared["parquet"].train[0], prepared["jsonl"].train[0])
    assert np.array_equal(prepared["parquet"].train.targets(0), prepared["jsonl"].train.targets(0))
