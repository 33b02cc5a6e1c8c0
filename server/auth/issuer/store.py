"""What the dev issuer remembers: registered clients and refresh tokens (SQLite), authorization codes (memory).

Refresh tokens rotate, and each one belongs to a family: every token descended from one authorization
grant. A rotated token is kept (as rotated) until it would have expired, so that its reuse is seen: a
reused refresh token means it leaked (the client or the thief holds its successor), and the whole family
is revoked (OAuth 2.1 §4.3.1, RFC 9700 §4.14.2).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from authlib.oauth2.rfc6749 import ClientMixin

from server.auth.issuer.identities import DemoIdentity

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (client_id TEXT PRIMARY KEY, document TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_sha256 TEXT PRIMARY KEY, client_id TEXT NOT NULL, identity TEXT NOT NULL, scope TEXT NOT NULL,
    expires_at REAL NOT NULL, family TEXT NOT NULL DEFAULT '', rotated INTEGER NOT NULL DEFAULT 0);
"""
_FAMILY_COLUMNS = (  # a dev-issuer.db written before refresh-token families
    "ALTER TABLE refresh_tokens ADD COLUMN family TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE refresh_tokens ADD COLUMN rotated INTEGER NOT NULL DEFAULT 0",
    "UPDATE refresh_tokens SET family = token_sha256 WHERE family = ''",
)
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
log = structlog.get_logger("castellan.issuer")


@dataclass(frozen=True, slots=True)
class IssuerClient(ClientMixin):  # type: ignore[misc]
    """A registered client (RFC 7591), a client ID metadata document's client, or a demo agent.

    `secret` None: a public client (PKCE, `token_endpoint_auth_method = none`). `identity`: a demo agent
    that signs in as itself with client credentials."""

    client_id: str
    redirect_uris: tuple[str, ...] = ()
    grant_types: tuple[str, ...] = ("authorization_code", "refresh_token")
    response_types: tuple[str, ...] = ("code",)
    auth_method: str = "none"
    secret: str | None = None
    name: str = ""
    identity: str | None = None
    from_metadata_document: bool = False

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str:
        # Any scope may be asked for; the sign-in page grants what the chosen identity may have.
        return scope or ""

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return any(_redirect_matches(registered, redirect_uri) for registered in self.redirect_uris)

    def check_client_secret(self, client_secret: str) -> bool:
        return self.secret is not None and secrets.compare_digest(self.secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        demo_agent = self.identity is not None and method in ("client_secret_basic", "client_secret_post")
        return method == self.auth_method or demo_agent

    def check_response_type(self, response_type: str) -> bool:
        return response_type in self.response_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types

    def document(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "redirect_uris": list(self.redirect_uris),
            "grant_types": list(self.grant_types),
            "response_types": list(self.response_types),
            "token_endpoint_auth_method": self.auth_method,
            "client_secret": self.secret,
            "client_name": self.name,
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any], *, from_metadata_document: bool = False) -> IssuerClient:
        return cls(
            client_id=str(doc["client_id"]),
            redirect_uris=tuple(doc.get("redirect_uris") or ()),
            grant_types=tuple(doc.get("grant_types") or ("authorization_code",)),
            response_types=tuple(doc.get("response_types") or ("code",)),
            auth_method=str(doc.get("token_endpoint_auth_method") or "client_secret_basic"),
            secret=doc.get("client_secret"),
            name=str(doc.get("client_name") or ""),
            from_metadata_document=from_metadata_document,
        )


def _redirect_matches(registered: str, presented: str) -> bool:
    """Exact match, except that a loopback redirect may use any port (RFC 8252 §7.3: native apps)."""
    if registered == presented:
        return True
    a, b = urlsplit(registered), urlsplit(presented)
    return (
        a.scheme == b.scheme == "http"
        and a.hostname in _LOOPBACK
        and a.hostname == b.hostname
        and (a.path, a.query) == (b.path, b.query)
    )


@dataclass(frozen=True, slots=True)
class SignIn:
    """What the person on the sign-in page chose: who they are, and which of the requested scopes to grant."""

    identity: DemoIdentity
    scopes: tuple[str, ...]

    def get_user_id(self) -> str:
        return self.identity.name


@dataclass(frozen=True, slots=True)
class AuthorizationCode:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    identity: str
    code_challenge: str
    code_challenge_method: str
    expires_at: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass(frozen=True, slots=True)
class RefreshToken:
    client_id: str
    identity: str
    scope: str
    expires_at: float
    token_sha256: str = field(repr=False)
    family: str = field(default="", repr=False)

    def check_client(self, client: IssuerClient) -> bool:
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        return self.scope


class IssuerStore:
    """Clients and refresh tokens in `<data_dir>/dev-issuer.db`, so a restarted demo keeps its sign-ins;
    authorization codes (single use, `code_ttl` seconds) in memory. Refresh tokens are kept as SHA-256
    digests only."""

    def __init__(self, path: Path, *, code_ttl: float = 300.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(refresh_tokens)")}
        if "family" not in columns:
            for statement in _FAMILY_COLUMNS:
                self._db.execute(statement)
        self._lock = threading.Lock()
        self._codes: dict[str, AuthorizationCode] = {}
        self._code_ttl = code_ttl

    def close(self) -> None:
        self._db.close()

    def save_client(self, client: IssuerClient) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO clients VALUES (?, ?, ?)",
                (client.client_id, json.dumps(client.document()), time.time()),
            )

    def client(self, client_id: str) -> IssuerClient | None:
        with self._lock:
            row = self._db.execute("SELECT document FROM clients WHERE client_id = ?", (client_id,)).fetchone()
        return IssuerClient.from_document(json.loads(row[0])) if row else None

    def save_code(self, code: AuthorizationCode) -> None:
        with self._lock:
            now = time.time()
            self._codes = {k: v for k, v in self._codes.items() if v.expires_at > now}
            self._codes[code.code] = code

    def code(self, code: str, client_id: str) -> AuthorizationCode | None:
        with self._lock:
            found = self._codes.get(code)
        if found is None or found.client_id != client_id or found.expires_at < time.time():
            return None
        return found

    def use_code(self, code: str) -> None:
        with self._lock:
            self._codes.pop(code, None)

    def code_expiry(self) -> float:
        return time.time() + self._code_ttl

    def save_refresh_token(
        self, token: str, client_id: str, identity: str, scope: str, ttl: float, *, family: str | None = None
    ) -> None:
        """Store a new refresh token: the first of a new family (a grant), or a successor in `family`."""
        with self._lock:
            self._insert_refresh_token(token, client_id, identity, scope, ttl, family)

    def rotate_refresh_token(
        self, old: RefreshToken, token: str, client_id: str, identity: str, scope: str, ttl: float
    ) -> None:
        """Replace `old` by `token` in its family, atomically. Raises `RefreshTokenReused` (and revokes
        the family) when `old` was rotated meanwhile: two refreshes raced with the same token."""
        with self._lock:
            marked = self._db.execute(
                "UPDATE refresh_tokens SET rotated = 1 WHERE token_sha256 = ? AND rotated = 0", (old.token_sha256,)
            ).rowcount
            if marked != 1:
                self._revoke_family(old.family)
                raise RefreshTokenReused(old.family)
            self._insert_refresh_token(token, client_id, identity, scope, ttl, old.family)

    def refresh_token(self, token: str) -> RefreshToken | None:
        """The live refresh token `token` is, or None. Presenting a rotated token revokes its family."""
        with self._lock:
            row = self._db.execute(
                "SELECT client_id, identity, scope, expires_at, token_sha256, family, rotated FROM refresh_tokens "
                "WHERE token_sha256 = ? AND expires_at >= ?",
                (_digest(token), time.time()),
            ).fetchone()
            if row is not None and row[6]:
                revoked = self._revoke_family(row[5])
                log.warning("refresh_token_reused", client_id=row[0], identity=row[1], family_revoked=revoked)
                return None
        return RefreshToken(*row[:6]) if row else None

    def revoke_refresh_token(self, token: RefreshToken) -> None:
        with self._lock:
            self._db.execute("DELETE FROM refresh_tokens WHERE token_sha256 = ?", (token.token_sha256,))

    def _insert_refresh_token(
        self, token: str, client_id: str, identity: str, scope: str, ttl: float, family: str | None
    ) -> None:
        digest = _digest(token)
        self._db.execute(
            "INSERT INTO refresh_tokens VALUES (?, ?, ?, ?, ?, ?, 0)",
            (digest, client_id, identity, scope, time.time() + ttl, family or digest),
        )
        self._db.execute("DELETE FROM refresh_tokens WHERE expires_at < ?", (time.time(),))

    def _revoke_family(self, family: str) -> int:
        """Delete every token of `family` (the caller holds the lock); how many were still live."""
        live = self._db.execute(
            "SELECT COUNT(*) FROM refresh_tokens WHERE family = ? AND rotated = 0", (family,)
        ).fetchone()[0]
        self._db.execute("DELETE FROM refresh_tokens WHERE family = ?", (family,))
        return int(live)


class RefreshTokenReused(Exception):
    """A rotated refresh token was presented again; its family (named here) is revoked."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
