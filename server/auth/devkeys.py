"""Dev mode: a locally generated signing key, with which `castellan token` and the dev issuer mint tokens."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

DEV_ALGORITHM = "ES256"
KEY_FILE = "dev-signing-key.json"


def load_or_create_dev_key(data_dir: Path) -> ECKey:
    """The dev signing key under `data_dir`, created (mode 0600) on first use."""
    path = data_dir / KEY_FILE
    if path.is_file():
        return ECKey.import_key(json.loads(path.read_text()))
    data_dir.mkdir(parents=True, exist_ok=True)
    key = ECKey.generate_key("P-256", parameters={"kid": f"dev-{uuid.uuid4().hex[:12]}", "use": "sig"})
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(key.as_dict(private=True), fh)
    os.replace(tmp, path)
    return key


def dev_public_keys(data_dir: Path) -> KeySet:
    key = load_or_create_dev_key(data_dir)
    return KeySet([ECKey.import_key(key.as_dict(private=False))])


def mint_dev_token(
    data_dir: Path,
    *,
    agent: str,
    issuer: str,
    audience: str,
    groups: Sequence[str] = (),
    scopes: Sequence[str] = (),
    subject: str | None = None,
    ttl_seconds: int = 3600,
    client_id: str | None = None,
) -> str:
    """A signed JWT for `agent`, valid `ttl_seconds`, for this gateway's resource URL only."""
    key = load_or_create_dev_key(data_dir)
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": subject or agent,
        "agent_id": agent,
        "groups": list(groups),
        "scope": " ".join(scopes),
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    if client_id is not None:  # RFC 9068 §2.2: the OAuth client the token was issued to
        claims["client_id"] = client_id
    return jwt.encode({"alg": DEV_ALGORITHM, "kid": key.kid, "typ": "JWT"}, claims, key)
