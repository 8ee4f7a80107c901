"""`data`: sources, validation, tokenizer, packing and cache of a dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from ava.config.checks import one_of, require

IGNORE_INDEX = -100  # a label that is not a loss target (transformers' convention), from loader to loss


@dataclass
class SourceConfig:
    """One input of a dataset: a local path/glob, or a `datasets` reference."""

    path: Optional[str] = None  # file, directory or glob; or a `load_from_disk` directory
    builder: Optional[str] = None  # `datasets.load_dataset(builder, data_files=...)`
    data_files: List[str] = field(default_factory=list)
    format: str = "auto"  # auto | txt | jsonl | json | parquet | csv | arrow
    text_field: str = "text"
    txt_mode: str = "paragraph"  # paragraph: blank-line separated documents; file: one per file
    split: str = "train"
    csv_delimiter: str = ","

    def __post_init__(self) -> None:
        require((self.path is None) != (self.builder is None),
                 f"data.sources entry {self.path or self.builder!r}: set exactly one of "
                 "`path` (file, directory, glob or saved dataset) and `builder`")
        one_of("data.sources.format", self.format,
                ("auto", "txt", "jsonl", "json", "parquet", "csv", "arrow"))
        one_of("data.sources.txt_mode", self.txt_mode, ("paragraph", "file"))
        require(bool(self.text_field), "data.sources.text_field must not be empty")


@dataclass
class TokenizerConfig:
    """Byte-level BPE: load `path`, or train one on the training split."""

    path: Optional[str] = None
    vocab_size: Optional[int] = None  # default: the model's vocab size
    min_frequency: int = 2
    special_tokens: List[str] = field(default_factory=lambda: ["<|endoftext|>", "<|pad|>"])
    eos_token: str = "<|endoftext|>"  # appended after every document when packing
    pad_token: str = "<|pad|>"

    def __post_init__(self) -> None:
        for key in ("eos_token", "pad_token"):
            token = getattr(self, key)
            require(token in self.special_tokens,
                     f"data.tokenizer.{key}={token!r} must be listed in "
                     f"data.tokenizer.special_tokens={list(self.special_tokens)}")
        require(self.min_frequency > 0,
                 f"data.tokenizer.min_frequency={self.min_frequency} must be positive")
        if self.vocab_size is not None:
            # byte-level BPE starts from 256 byte tokens plus the special tokens
            smallest = 256 + len(self.special_tokens)
            require(self.vocab_size >= smallest,
                     f"data.tokenizer.vocab_size={self.vocab_size} is below the smallest "
                     f"byte-level vocabulary ({smallest}: 256 bytes + special tokens)")


@dataclass
class ChatConfig:
    """`data.kind=chat`: where the conversation is in a record and how it becomes tokens."""

    messages_field: str = "messages"  # a list of {role, content}
    prompt_field: str = "prompt"  # or a prompt/completion pair: one user turn, one assistant turn
    completion_field: str = "completion"
    # a Jinja chat template file; default: the `chat_template` of the tokenizer_config.json beside
    # data.tokenizer.path, else Ava's built-in ChatML template
    template: Optional[str] = None
    overlong: str = "truncate"  # a conversation over seq_len + 1 tokens: truncate | drop (both counted)

    def __post_init__(self) -> None:
        one_of("data.chat.overlong", self.overlong, ("truncate", "drop"))
        for key in ("messages_field", "prompt_field", "completion_field"):
            require(bool(getattr(self, key)), f"data.chat.{key} must not be empty")


@dataclass
class DataConfig:
    """A named dataset, how to validate it, tokenize it, pack it and cache it."""

    name: str = MISSING
    kind: str = "text"  # text: every token a target | chat: conversations through a chat template
    builtin: Optional[str] = None  # e.g. "python_docs"
    sources: List[SourceConfig] = field(default_factory=list)
    seq_len: int = 256
    val_fraction: float = 0.02
    strict: bool = False
    max_doc_chars: int = 200_000  # longer documents are split, never dropped
    report_examples: int = 5
    num_proc: int = 1
    batch_size: int = 1000  # documents per batch when reading, tokenizing and training BPE
    cache_dir: str = "${oc.env:AVA_CACHE,${oc.env:HOME,.}/.cache/ava}"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    train_on: str = "assistant"  # chat targets: assistant turns only | all tokens
    # attention stays inside each packed document and RoPE positions restart per document
    document_mask: bool = False

    def __post_init__(self) -> None:
        if self.name == MISSING:
            return
        require(self.seq_len > 0, f"data.seq_len={self.seq_len} must be positive")
        one_of("data.kind", self.kind, ("text", "chat"))
        one_of("data.train_on", self.train_on, ("assistant", "all"))
        require(0.0 <= self.val_fraction < 1.0,
                 f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        require(self.num_proc > 0, f"data.num_proc={self.num_proc} must be positive")
        require(self.batch_size > 0, f"data.batch_size={self.batch_size} must be positive")
        require(self.report_examples >= 0,
                 f"data.report_examples={self.report_examples} must be >= 0")
        require(self.max_doc_chars > 0,
                 f"data.max_doc_chars={self.max_doc_chars} must be positive")
        require(bool(self.builtin) or bool(self.sources),
                 f"data '{self.name}' names no source: set data.builtin or data.sources")
