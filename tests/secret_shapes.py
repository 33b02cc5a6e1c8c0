"""Secrets in the shapes they take in tool arguments, results and reasons, freshly random on every run.

Each shape gives a text holding a secret and the parts of it that must never be written anywhere.
The seed is printed in a test's name-independent way (`SEED`), and `CASTELLAN_SECRET_SEED` replays one.
"""

from __future__ import annotations

import base64
import json
import os
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

SEED = int(os.environ.get("CASTELLAN_SECRET_SEED", random.SystemRandom().randrange(2**32)))
_rng = random.Random(SEED)

_ALNUM = string.ascii_letters + string.digits
_B64 = _ALNUM + "+/"


def _pick(chars: str, n: int) -> str:
    # Random, and never all of one class: a real key mixes upper, lower and digits.
    while True:
        value = "".join(_rng.choice(chars) for _ in range(n))
        if any(c.isdigit() for c in value) and any(c.isalpha() for c in value):
            return value


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Secret:
    shape: str
    text: str
    """A sentence, header or document holding the secret."""
    parts: tuple[str, ...]
    """What must not appear in anything written (each at least 8 characters)."""


def aws_access_key_id() -> Secret:
    key = _rng.choice(["AKIA", "ASIA"]) + _pick(string.ascii_uppercase + "234567", 16)
    return Secret("aws_access_key_id", _rng.choice([f"use {key} for s3", f"AWS_ACCESS_KEY_ID={key}"]), (key,))


def aws_secret_access_key() -> Secret:
    key = _pick(_B64, 40)
    text = _rng.choice(
        [f"aws_secret_access_key = {key}", f'{{"AwsSecretAccessKey": "{key}"}}', f"AWS_SECRET_ACCESS_KEY={key}"]
    )
    return Secret("aws_secret_access_key", text, (key,))


def url_password() -> Secret:
    password = _pick(_ALNUM, _rng.randint(10, 18))
    scheme = _rng.choice(["postgres", "mysql", "https", "redis", "amqp"])
    return Secret("url_password", f"connect to {scheme}://svc_user:{password}@db.internal:5432/app now", (password,))


def key_value() -> Secret:
    value = _pick(_ALNUM + "!#%*", _rng.randint(10, 20))
    name = _rng.choice(["password", "passwd", "secret", "api_key", "client_secret", "db_pass", "pwd"])
    text = _rng.choice([f"{name}={value}", f"{name}: {value}", f'{name} = "{value}"', f"config {name}='{value}' ok"])
    return Secret("key_value", text, (value,))


def bearer_token() -> Secret:
    token = _pick(_ALNUM + "-._~", _rng.randint(24, 48))
    text = _rng.choice(
        [f"Authorization: Bearer {token}", f"curl -H 'Authorization: Bearer {token}' https://x", f"bearer {token}"]
    )
    return Secret("bearer_token", text, (token,))


def jwt() -> Secret:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps({"sub": _pick(_ALNUM, 12), "exp": _rng.randint(2**30, 2**31)}).encode())
    signature = _b64url(_rng.randbytes(32))
    token = f"{header}.{payload}.{signature}"
    return Secret("jwt", f"token was {token} yesterday", (payload, signature))


def private_key() -> Secret:
    kind = _rng.choice(["RSA ", "EC ", "OPENSSH ", ""])
    lines = [base64.b64encode(_rng.randbytes(48)).decode() for _ in range(_rng.randint(3, 6))]
    pem = f"-----BEGIN {kind}PRIVATE KEY-----\n" + "\n".join(lines) + f"\n-----END {kind}PRIVATE KEY-----"
    return Secret("private_key", f"here is the key:\n{pem}\nthanks", tuple(lines))


def vendor_token() -> Secret:
    token = _rng.choice(
        [
            "ghp_" + _pick(_ALNUM, 36),
            "xoxb-" + "".join(_rng.choice(string.digits) for _ in range(12)) + "-" + _pick(_ALNUM, 24),
            "sk_live_" + _pick(_ALNUM, 24),
        ]
    )
    return Secret("vendor_token", f"the token {token} works", (token,))


SHAPES: tuple[Callable[[], Secret], ...] = (
    aws_access_key_id,
    aws_secret_access_key,
    url_password,
    key_value,
    bearer_token,
    jwt,
    private_key,
    vendor_token,
)


def secret_field() -> tuple[str, str]:
    """A field whose name says "secret" (not one of the configured names) and a random value for it."""
    name = _rng.choice(["db_credential", "stripeApiToken", "x-session-key", "signing_passphrase", "auth_blob"])
    return name, _pick(_B64, _rng.randint(20, 40))


def leaks(written: bytes | str, secrets: list[Secret] | tuple[Secret, ...], extra: tuple[str, ...] = ()) -> list[str]:
    """Every secret part found in `written` (JSON-escaped forms too), by shape."""
    data = written.encode() if isinstance(written, str) else written
    found = []
    for secret in secrets:
        for part in secret.parts:
            if part.encode() in data or json.dumps(part)[1:-1].encode() in data:
                found.append(f"{secret.shape}: {part}")
    found += [f"field: {part}" for part in extra if part.encode() in data]
    return found
