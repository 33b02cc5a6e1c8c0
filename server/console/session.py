"""The console session: a sealed (AES-256-GCM) HttpOnly cookie that carries the signed-in bearer token,
re-verified by the gateway's verifier on every request, and the CSRF token bound to it.

Nothing is kept server-side, so replicas that share `console.session_key` share sign-ins; a token that
expires, or whose signing key is withdrawn, ends its session at the next request. The cookie is
SameSite=Strict, Path=/console, and Secure when the console is served over TLS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.console.oauth import FLOW_TTL_SECONDS, Flow

COOKIE = "castellan_console"
PRE_COOKIE = "castellan_console_pre"
"""Before sign-in: a random value the sign-in form's CSRF token is bound to."""
FLOW_COOKIE = "castellan_console_oauth"
"""During an OAuth sign-in: the sealed `Flow` (state, PKCE verifier) the callback must match."""
_AAD = b"castellan-console-session-v1"
_FLOW_AAD = b"castellan-console-oauth-flow-v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    token: str
    sid: str
    issued_at: float


class SessionSealer:
    """Seals and opens session cookies, and derives CSRF tokens; `open` returns None for anything
    it did not seal, that was altered, or that is older than `max_age` seconds."""

    def __init__(self, secret: bytes, max_age: float) -> None:
        if len(secret) < 32:
            raise ValueError("the console session key must be at least 32 bytes")
        material = hashlib.sha256(b"castellan-console\x00" + secret).digest()
        self._aead = AESGCM(hmac.new(material, b"seal", hashlib.sha256).digest())
        self._csrf_key = hmac.new(material, b"csrf", hashlib.sha256).digest()
        self.max_age = max_age

    @classmethod
    def from_file(cls, path: Path, max_age: float) -> SessionSealer:
        """The key in `path`, created (0600) with 32 random bytes when it does not exist."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process made it first
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32))
        return cls(path.read_text().strip().encode(), max_age)

    def _seal(self, body: dict[str, Any], aad: bytes) -> str:
        nonce = os.urandom(12)
        return _b64(nonce + self._aead.encrypt(nonce, json.dumps(body).encode(), aad))

    def _open(self, cookie: str | None, aad: bytes, max_chars: int) -> Any:
        """The JSON sealed in `cookie` under `aad`, or None (absent, too long, forged, altered, truncated,
        sealed by another key or for the other purpose)."""
        if not cookie or len(cookie) > max_chars:
            return None
        try:
            raw = _unb64(cookie)
            return json.loads(self._aead.decrypt(raw[:12], raw[12:], aad))
        except Exception:
            return None

    def seal(self, token: str, now: float | None = None) -> tuple[str, Session]:
        session = Session(token=token, sid=secrets.token_urlsafe(16), issued_at=now or time.time())
        return self._seal({"t": session.token, "s": session.sid, "i": session.issued_at}, _AAD), session

    def open(self, cookie: str | None, now: float | None = None) -> Session | None:
        body = self._open(cookie, _AAD, 8192)
        try:
            session = Session(token=str(body["t"]), sid=str(body["s"]), issued_at=float(body["i"]))
        except Exception:  # no body, or not a session's
            return None
        age = (now or time.time()) - session.issued_at
        return session if 0 <= age <= self.max_age else None

    def seal_flow(self, flow: Flow) -> str:
        return self._seal({"s": flow.state, "v": flow.verifier, "i": flow.started_at}, _FLOW_AAD)

    def open_flow(self, cookie: str | None, now: float | None = None) -> Flow | None:
        """The flow sealed in `cookie`, or None (forged, altered, a session cookie, or too old)."""
        body = self._open(cookie, _FLOW_AAD, 1024)
        try:
            flow = Flow(state=str(body["s"]), verifier=str(body["v"]), started_at=float(body["i"]))
        except Exception:  # no body, or not a flow's
            return None
        age = (now or time.time()) - flow.started_at
        return flow if 0 <= age <= FLOW_TTL_SECONDS else None

    def csrf_token(self, binding: str) -> str:
        """The form token for a session id (or, before sign-in, the pre-session cookie's value)."""
        return _b64(hmac.new(self._csrf_key, binding.encode(), hashlib.sha256).digest())

    def csrf_valid(self, binding: str | None, token: str | None) -> bool:
        if not binding or not token:
            return False
        return hmac.compare_digest(self.csrf_token(binding), token)
