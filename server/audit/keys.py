"""The audit chain key: a secret kept outside the audit database, so that whoever can rewrite the
database cannot recompute the chain over what they rewrote.

Where it comes from, first found wins: `audit.chain_key` (settings or `CASTELLAN_AUDIT__CHAIN_KEY`),
`audit.chain_key_file` (a file, e.g. a mounted secret), else in dev a key generated on first start at
`<data_dir>/audit-chain-key` (mode 0600, like the dev signing key). Production refuses to start
without one configured explicitly.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.errors import ConfigError

if TYPE_CHECKING:
    from server.settings import Settings

DEV_KEY_FILE = "audit-chain-key"
# How a supervising gateway hands the key to its `castellan ship` child (settings reach it as JSON,
# where a secret is masked).
KEY_ENV = "CASTELLAN_SHIPPER_CHAIN_KEY"
_MIN_KEY_CHARS = 32


@dataclass(frozen=True, slots=True)
class ChainKey:
    """An HMAC-SHA256 key and its public id (a hash of it: which key made a record, never the key)."""

    secret: bytes
    source: str = "generated"

    @property
    def key_id(self) -> str:
        return hashlib.sha256(b"castellan-audit-key-id\0" + self.secret).hexdigest()[:16]

    def mac(self, message: bytes) -> str:
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    @classmethod
    def generate(cls) -> ChainKey:
        return cls(secrets.token_hex(32).encode(), "generated")

    @classmethod
    def from_text(cls, text: str, source: str) -> ChainKey:
        value = text.strip()
        if len(value) < _MIN_KEY_CHARS:
            raise ConfigError(f"the audit chain key from {source} is too short ({len(value)} < {_MIN_KEY_CHARS} chars)")
        return cls(value.encode(), source)

    @classmethod
    def from_file(cls, path: Path) -> ChainKey:
        """A key file holds the key as text (`openssl rand -hex 32`), or as raw bytes (a binary secret, as
        `head -c 32 /dev/urandom` writes and some secret stores mount, used as its hex): at least 32 either way."""
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"audit.chain_key_file {path}: {exc.strerror or exc}") from None
        try:
            return cls.from_text(raw.decode("utf-8"), str(path))
        except UnicodeDecodeError:
            if len(raw) < _MIN_KEY_CHARS:
                raise ConfigError(
                    f"the audit chain key from {path} is too short ({len(raw)} < {_MIN_KEY_CHARS} bytes)"
                ) from None
            return cls(raw.hex().encode(), str(path))  # as text, so it can reach the shipper child too


def load_chain_key(
    *,
    key: str | None,
    key_file: Path | None,
    data_dir: Path,
    environment: str,
    create: bool = True,
    allow_dev_key: bool = False,
) -> ChainKey:
    """The configured key. Raises `ConfigError` when none is configured in production (unless
    `allow_dev_key`: `audit.chain_key` listed in `production_overrides`), or when the configured file is
    missing or too short."""
    if key:
        return ChainKey.from_text(key, "audit.chain_key")
    if key_file is not None:
        return ChainKey.from_file(key_file)
    if environment == "production" and not allow_dev_key:
        raise ConfigError(
            "environment = 'production' needs an audit chain key kept outside the data directory: "
            "set audit.chain_key_file (a mounted secret) or CASTELLAN_AUDIT__CHAIN_KEY"
        )
    path = data_dir / DEV_KEY_FILE
    if path.is_file():
        return ChainKey.from_file(path)
    if not create:
        raise ConfigError(f"no audit chain key at {path}: the gateway has not started here yet")
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(temporary, path)  # never replaces a key another process created meanwhile
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return ChainKey.from_file(path)


def chain_key_for(settings: Settings, *, create: bool = True) -> ChainKey:
    """The chain key `settings` configure (see the module docstring)."""
    audit = settings.audit
    return load_chain_key(
        key=audit.chain_key.get_secret_value() if audit.chain_key else None,
        key_file=audit.chain_key_file,
        data_dir=settings.data_dir,
        environment=settings.environment,
        create=create,
        allow_dev_key="audit.chain_key" in settings.production_overrides,
    )
