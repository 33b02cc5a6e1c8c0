"""Tokens sealed at rest: AES-256-GCM under a key kept outside the database, bound to their row."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.credentials.secrets import read_secret
from server.errors import ConfigError
from server.settings import Settings

KEY_FILE = "credentials-key"


class Unsealable(Exception):
    """A sealed value that this key cannot open, or that was moved to another row."""


class Sealer:
    """`seal(value, context)` / `open(sealed, context)`. `context` (the upstream and subject a token belongs
    to) is authenticated with it, so a sealed token copied onto another user's row does not open."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigError("credentials.key must be 32 bytes (base64-encoded)")
        self._aead = AESGCM(key)

    def seal(self, value: str, context: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, value.encode(), context.encode())

    def open(self, sealed: bytes, context: str) -> str:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], context.encode()).decode()
        except (InvalidTag, ValueError) as exc:
            raise Unsealable("sealed credential cannot be opened with this key for this grant") from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> Sealer:
        """The configured key; in dev without one, `<data_dir>/credentials-key`, created (0600) on first use."""
        source = settings.credentials.key
        if source.env or source.file:
            text = read_secret(source, "credentials.key")
        else:
            path = settings.data_dir / KEY_FILE
            text = _dev_key(path)
        try:
            return cls(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise ConfigError("credentials.key is not base64") from None


def _dev_key(path: Path) -> str:
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = base64.b64encode(os.urandom(32)).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return text
