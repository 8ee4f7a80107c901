"""The trained tokenizer the inference tests share: every family's tiny checkpoint gets one."""

from tests.unit.inference.conftest import tokenizer_file  # noqa: F401
