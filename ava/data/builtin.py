"""Built-in corpora that need no download. `python_docs`: English prose shipped with Python;
`python_qa`: conversations made from it (data.kind=chat).

It is the interactive-help topics of `pydoc_data.topics` plus the docstrings of the standard
library's modules (and of their public classes, functions and methods), about 2 MB.
The build is deterministic on one Python installation: modules come from the sorted
`sys.stdlib_module_names` and sorted `pkgutil` listings, members in sorted order, no
signatures or reprs (which can hold memory addresses), and it runs in a fresh isolated
interpreter (`python_docs.py`). Modules with import-time side effects (opening a browser,
printing, GUI toolkits, terminal setup) are never imported.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

from ava.data.errors import DataSourceError
from ava.data.validate import RawRecord

Document = Tuple[str, str]  # (location, text)
BUILDER = Path(__file__).with_name("python_docs.py")


def python_docs_documents() -> List[Document]:
    """Build `python_docs` in a fresh `python -I -S` (isolated, stdlib only) process."""
    with tempfile.TemporaryDirectory(prefix="ava-python-docs-") as tmp:
        out = Path(tmp) / "python_docs.json"
        result = subprocess.run([sys.executable, "-I", "-S", str(BUILDER), str(out)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0 or not out.is_file():
            raise DataSourceError(f"building the python_docs corpus with {sys.executable} "
                                  f"failed (exit {result.returncode}): {result.stderr[-2000:]}")
        return [(location, text) for location, text in json.loads(out.read_text("utf-8"))]


def corpus_hash(documents: List[Document]) -> str:
    """sha256 of the documents' texts (what determinism tests compare)."""
    digest = hashlib.sha256()
    for _location, text in documents:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


HEADER = re.compile(r"^(function|method|class) ([\w.]+)$")
QA_SYSTEM = "You answer questions about the Python standard library in one paragraph."
QA_SYSTEM_EVERY = 3  # every third conversation has a system prompt, so both shapes are trained


def python_qa_conversations() -> List[Tuple[str, list]]:
    """One conversation per documented function, method or class of `python_docs`: the question
    names it, the answer is its docstring's first paragraph."""
    conversations: List[Tuple[str, list]] = []
    for location, text in python_docs_documents():
        paragraphs = text.split("\n\n")
        for header, answer in itertools.pairwise(paragraphs):
            match = HEADER.match(header)
            if match is None or HEADER.match(answer) or not answer.strip():
                continue
            kind, name = match.groups()
            messages = [{"role": "user", "content": f"What does the {kind} `{name}` do?"},
                        {"role": "assistant", "content": answer.strip()}]
            if len(conversations) % QA_SYSTEM_EVERY == 0:
                messages.insert(0, {"role": "system", "content": QA_SYSTEM})
            conversations.append((f"{location}#{name}", messages))
    return conversations


@dataclass(frozen=True)
class BuiltinCorpus:
    """A named corpus built in code; bump `version` whenever the builder's output changes."""

    name: str
    version: str
    build: Callable[[], list]
    kind: str = "text"  # the data.kind it serves: text documents or chat conversations

    def records(self) -> Iterator[RawRecord]:
        for location, content in self.build():
            if self.kind == "chat":
                yield RawRecord(location, messages=content)
            else:
                yield RawRecord(location, text=content)


CORPORA: Dict[str, BuiltinCorpus] = {
    "python_docs": BuiltinCorpus("python_docs", "2", python_docs_documents),
    "python_qa": BuiltinCorpus("python_qa", "1", python_qa_conversations, kind="chat"),
}


def get(name: str, kind: str = "text") -> BuiltinCorpus:
    """The corpus `name`, which must serve `data.kind=kind`."""
    if name not in CORPORA:
        raise DataSourceError(f"data.builtin={name!r} is not a built-in corpus; "
                              f"available: {sorted(CORPORA)}")
    corpus = CORPORA[name]
    if corpus.kind != kind:
        fitting = sorted(n for n, c in CORPORA.items() if c.kind == kind)
        raise DataSourceError(f"data.builtin={name!r} holds {corpus.kind} records but data.kind={kind}; "
                              f"built-in corpora for data.kind={kind}: {fitting}")
    return corpus
