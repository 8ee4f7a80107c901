"""The one error type of configuration and the two checks every schema uses."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what was expected."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    require(value in allowed, f"{key}={value!r} is not supported; expected one of {list(allowed)}")
