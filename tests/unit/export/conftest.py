"""The trained tokenizer the export tests share (the same fixture as the inference tests')."""

from tests.unit.inference.conftest import tokenizer_file  # noqa: F401
