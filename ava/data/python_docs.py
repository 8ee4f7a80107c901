"""Builder of the `python_docs` corpus, run as a script in a fresh `python -I -S` process.

Standard library only, on purpose: a fresh interpreter without site-packages sees exactly the
stdlib as installed, untouched by whatever the calling process imported or patched (pytest,
for one, replaces `sys.unraisablehook`, whose docstring would then change the corpus), and
the trainer's process does not end up importing hundreds of modules. Writes the documents as
a JSON list of `[location, text]` pairs to the file named by its one argument (not
stdout, which a module could write to while being imported).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings
from types import ModuleType
from typing import List, Tuple

# Never imported: side effects on import, GUI/terminal toolkits, tests, or content that
# setuptools can replace (distutils). `pydoc_data` is read separately as the help topics.
SKIP_MODULES = frozenset({
    "antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib", "readline",
    "rlcompleter", "test", "lib2to3", "distutils", "ensurepip", "pydoc_data", "msilib",
    "winreg", "winsound", "msvcrt", "nt", "encodings",
})
SKIP_PARTS = frozenset({"test", "tests", "idle_test"})

Document = Tuple[str, str]  # (location, text)


def _quiet_import(name: str) -> ModuleType | None:
    """Import a module with warnings and output suppressed; None if it cannot be imported
    on this platform (e.g. Windows-only modules)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):  # a broken optional module must not stop the build
            return None


def _module_names() -> List[str]:
    """Public stdlib modules and their public submodules, sorted."""
    names: List[str] = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP_MODULES:
            continue
        module = _quiet_import(top)
        if module is None:
            continue
        names.append(top)
        if hasattr(module, "__path__"):
            for info in sorted(pkgutil.walk_packages(module.__path__, prefix=top + ".",
                                                     onerror=lambda _name: None),
                               key=lambda i: i.name):
                parts = info.name.split(".")
                if any(p.startswith("_") or p in SKIP_PARTS for p in parts):
                    continue
                names.append(info.name)
    return sorted(set(names))


def _doc(obj: object) -> str:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else ""


def _class_document(qualname: str, cls: type) -> str:
    """A class's docstring, then its own public methods' and properties' docstrings."""
    parts = [f"class {qualname}", _doc(cls)] if _doc(cls) else [f"class {qualname}"]
    for member_name in sorted(vars(cls)):
        member = vars(cls)[member_name]
        if member_name.startswith("_") or not _doc(member):
            continue
        if inspect.isroutine(member) or isinstance(member, (property, classmethod,
                                                            staticmethod)):
            parts += [f"method {qualname}.{member_name}", _doc(member)]
    return "\n\n".join(parts) if len(parts) > 1 else ""


def _module_documents(name: str) -> List[Document]:
    """One document for the module (its docstring and its public functions' docstrings) and
    one per public class defined in it; headers `kind qualified.name` precede docstrings."""
    module = _quiet_import(name)
    if module is None:
        return []
    parts = [f"Module {name}", _doc(module)] if _doc(module) else [f"Module {name}"]
    classes: List[Document] = []
    for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            text = _class_document(f"{name}.{attr}", obj)
            if text:
                classes.append((f"python_docs:class/{name}.{attr}", text))
        elif inspect.isroutine(obj) and _doc(obj):
            parts += [f"function {name}.{attr}", _doc(obj)]
    module_doc = [(f"python_docs:module/{name}", "\n\n".join(parts))] if len(parts) > 1 else []
    return module_doc + classes


def build() -> List[Document]:
    """The corpus: help topics (sorted by name), then per module its own document and one
    per class."""
    from pydoc_data.topics import topics

    docs: List[Document] = [(f"python_docs:topic/{key}", f"Help topic {key}\n\n{text.strip()}")
                            for key, text in sorted(topics.items()) if text.strip()]
    for name in _module_names():
        docs.extend(_module_documents(name))
    return docs


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        documents = build()
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        json.dump(documents, out, ensure_ascii=True)
