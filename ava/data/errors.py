"""Error types of the data pipeline: each message names the file, line or config key at fault."""

from __future__ import annotations


class DataError(ValueError):
    """Base class: bad input data or a data setting that cannot work."""


class DataSourceError(DataError):
    """A source cannot be found, opened or read (missing path, unknown format, bad schema)."""


class DataValidationError(DataError):
    """`data.strict=true` met a bad record; the message holds `file:line: reason: detail`."""


class TokenizerMismatchError(DataError):
    """The tokenizer's vocabulary does not fit the model's embedding table."""
