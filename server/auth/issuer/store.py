"""What the dev issuer remembers: registered clients and refresh tokens (SQLite), authorization codes (memory)."""

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

from authlib.oauth2.rfc6749 import ClientMixin

from server.auth.issuer.identities import DemoIdentity

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (client_id TEXT PRIMARY KEY, document TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_sha256 TEXT PRIMARY KEY, client_id TEXT NOT NULL, identity TEXT NOT NULL, scope TEXT NOT NULL,
    expires_at REAL NOT NULL);
"""
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


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

    def save_refresh_token(self, token: str, client_id: str, identity: str, scope: str, ttl: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO refresh_tokens VALUES (?, ?, ?, ?, ?)",
                (_digest(token), client_id, identity, scope, time.time() + ttl),
            )
            self._db.execute("DELETE FROM refresh_tokens WHERE expires_at < ?", (time.time(),))

    def refresh_token(self, token: str) -> RefreshToken | None:
        with self._lock:
            row = self._db.execute(
                "SELECT client_id, identity, scope, expires_at, token_sha256 FROM refresh_tokens "
                "WHERE token_sha256 = ? AND expires_at >= ?",
                (_digest(token), time.time()),
            ).fetchone()
        return RefreshToken(*row) if row else None

    def revoke_refresh_token(self, token: RefreshToken) -> None:
        with self._lock:
            self._db.execute("DELETE FROM refresh_tokens WHERE token_sha256 = ?", (token.token_sha256,))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
