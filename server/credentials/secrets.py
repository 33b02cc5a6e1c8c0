"""Static secrets read from where the operator keeps them (an environment variable, a mounted file)."""

from __future__ import annotations

import os

from server.errors import ConfigError
from server.settings import SecretSource


def read_secret(source: SecretSource, what: str) -> str:
    """The secret `source` names, stripped of a trailing newline. Raises `ConfigError` (naming the
    source, never the value) when it is unset, missing or empty."""
    if source.env:
        value = os.environ.get(source.env, "")
        if not value:
            raise ConfigError(f"{what}: environment variable {source.env} is not set")
        return value
    if source.file is not None:
        try:
            value = source.file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {source.file}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"{what}: {source.file} is empty")
        return value
    raise ConfigError(f"{what}: no source configured (env or file)")
