"""Record validation: every record read is either kept or counted as skipped with a reason.

Readers (`formats.py`) turn raw input into `RawRecord`s that carry either text or the problem
found while decoding/parsing it; `Validator` adds the checks that apply to every format
(empty text, over-long documents), keeps the counts and examples, and enforces `strict`.
The invariant `read == kept + sum(skipped.values())` holds by construction.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

from ava.data.errors import DataValidationError

# Reasons a record is skipped; the report and tests use these exact names.
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
NON_STRING_FIELD = "non_string_field"
EMPTY_TEXT = "empty_text"
SKIP_REASONS = (INVALID_UTF8, MALFORMED_JSON, MISSING_FIELD, NON_STRING_FIELD, EMPTY_TEXT)
# Not skips: an over-long document kept as several pieces; a conversation cut to seq_len + 1 tokens.
SPLIT = "split_too_long"
TRUNCATED = "truncated"


@dataclass(frozen=True)
class RawRecord:
    """One record as read: `text`, or `reason` (+ `detail`) when it could not be decoded."""

    location: str  # "file:line" (line-based formats) or "file:row N" (tables)
    text: Optional[str] = None
    messages: Optional[object] = None  # data.kind=chat: the conversation as read, checked later
    reason: Optional[str] = None
    detail: str = ""


def strict_message(location: str, reason: str, detail: str) -> str:
    """What `data.strict=true` says about the first bad record (fresh or from a cached report)."""
    return (f"{location}: {reason}: {detail} (data.strict=true stops at the first bad record; set "
            "data.strict=false to skip and count bad records instead)")


@dataclass
class ValidationReport:
    """Counts by reason and the first examples of each, saved as JSON next to the cache."""

    read: int = 0
    kept: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    split_documents: int = 0  # kept documents longer than max_doc_chars
    split_pieces: int = 0  # the documents they became
    truncated: int = 0  # conversations cut to seq_len + 1 tokens (data.chat.overlong=truncate)
    examples: Dict[str, List[str]] = field(default_factory=dict)
    # the first skipped record (location, reason, detail): a strict run that finds this report in
    # the cache stops with the message a fresh strict run would give
    first_skip: Optional[Dict[str, str]] = None

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def documents(self) -> int:
        """Documents that reach the tokenizer (kept records, split ones counted per piece)."""
        return self.kept - self.split_documents + self.split_pieces

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped),
                "split_documents": self.split_documents, "split_pieces": self.split_pieces,
                "truncated": self.truncated, "documents": self.documents, "examples": {k: list(v) for k, v in
                                                          self.examples.items()},
                "first_skip": self.first_skip}

    @classmethod
    def from_dict(cls, data: dict) -> ValidationReport:
        return cls(read=data["read"], kept=data["kept"], skipped=dict(data["skipped"]),
                   split_documents=data["split_documents"], split_pieces=data["split_pieces"],
                   truncated=data.get("truncated", 0),
                   examples={k: list(v) for k, v in data["examples"].items()},
                   first_skip=data.get("first_skip"))

    def strict_error(self) -> Optional[str]:
        """The strict-mode message for this report's first skipped record; None if none was."""
        if not self.total_skipped:
            return None
        first = self.first_skip or {}
        return strict_message(first.get("location", "?"), first.get("reason", "?"),
                              first.get("detail", ""))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> ValidationReport:
        return cls.from_dict(json.loads(path.read_text()))

    def lines(self) -> List[str]:
        """Plain-text rendering (one line per reason, with its examples)."""
        out = [f"records read {self.read}, kept {self.kept}, skipped {self.total_skipped}"]
        for reason, count in sorted(self.skipped.items()):
            shown = ", ".join(self.examples.get(reason, []))
            out.append(f"  skipped {reason}: {count}" + (f" (e.g. {shown})" if shown else ""))
        if self.split_documents:
            shown = ", ".join(self.examples.get(SPLIT, []))
            out.append(f"  split {self.split_documents} over-long documents into "
                       f"{self.split_pieces} pieces" + (f" (e.g. {shown})" if shown else ""))
        if self.truncated:
            shown = ", ".join(self.examples.get(TRUNCATED, []))
            out.append(f"  truncated {self.truncated} conversations to seq_len + 1 tokens"
                       + (f" (e.g. {shown})" if shown else ""))
        return out


def split_text(text: str, max_chars: int) -> List[str]:
    """Cut `text` into pieces of at most `max_chars`, preferring a whitespace boundary in the
    second half of each window; the pieces concatenate back to `text` exactly."""
    pieces: List[str] = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(ch, start + max_chars // 2, end) for ch in ("\n", " "))
        end = cut + 1 if cut > start else end
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


class Validator:
    """Consumes `RawRecord`s, yields what to keep, and fills a `ValidationReport`: the skip,
    drop and truncation bookkeeping every kind of record shares (text: `TextValidator`;
    conversations: `ava.data.chat.ChatValidator`)."""

    def __init__(self, *, strict: bool, report_examples: int) -> None:
        self.strict = strict
        self.report_examples = report_examples
        self.report = ValidationReport()
        self._skipped: Counter = Counter()

    def _example(self, reason: str, location: str) -> None:
        shown = self.report.examples.setdefault(reason, [])
        if len(shown) < self.report_examples:
            shown.append(location)

    def _skip(self, record: RawRecord, reason: str, detail: str) -> None:
        if self.strict:
            raise DataValidationError(strict_message(record.location, reason, detail))
        if self.report.first_skip is None:
            self.report.first_skip = {"location": record.location, "reason": reason, "detail": detail}
        self._skipped[reason] += 1
        self.report.skipped = dict(sorted(self._skipped.items()))
        self._example(reason, record.location)

    def drop(self, location: str, reason: str, detail: str) -> None:
        """A kept record found unusable later (a conversation too long once tokenized)."""
        self.report.kept -= 1
        self._skip(RawRecord(location), reason, detail)

    def truncate(self, location: str) -> None:
        self.report.truncated += 1
        self._example(TRUNCATED, location)

    def __call__(self, records: Iterable[RawRecord]) -> Iterator:
        raise NotImplementedError


class TextValidator(Validator):
    """Plain documents: empty ones skipped, those over `max_doc_chars` split (never dropped)."""

    def __init__(self, *, max_doc_chars: int, strict: bool, report_examples: int) -> None:
        super().__init__(strict=strict, report_examples=report_examples)
        self.max_doc_chars = max_doc_chars

    def __call__(self, records: Iterable[RawRecord]) -> Iterator[str]:
        for record in records:
            self.report.read += 1
            if record.reason is not None:
                self._skip(record, record.reason, record.detail)
                continue
            text = record.text
            if text is None or not text.strip():
                self._skip(record, EMPTY_TEXT, "the text is empty or only whitespace")
                continue
            self.report.kept += 1
            if len(text) <= self.max_doc_chars:
                yield text
                continue
            pieces = split_text(text, self.max_doc_chars)
            self.report.split_documents += 1
            self.report.split_pieces += len(pieces)
            self._example(SPLIT, record.location)
            yield from pieces
