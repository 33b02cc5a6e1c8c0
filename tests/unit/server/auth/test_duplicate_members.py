"""A token whose header or payload repeats a member name is refused: the gateway and any other reader of
the same token (an audit tool, an upstream, a proxy) must not be able to disagree on `alg`, `aud`,
`exp` or `groups`. Every token here is validly signed: only the duplicate is wrong."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from server.auth.keys import KeyUnavailable, parse_jwks
from server.auth.strict_json import AmbiguousJson, loads_strict
from server.errors import Unauthenticated
from tests.unit.server.auth.test_verifier import AUDIENCE, ISSUER, KEY, verifier

pytestmark = pytest.mark.anyio


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def signed(header_json: str, payload_json: str) -> str:
    """A compact JWS over exactly these JSON texts (duplicates and all), signed with the trusted key."""
    signing_input = f"{b64(header_json)}.{b64(payload_json)}"
    der = KEY.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr]
    r, s = decode_dss_signature(der)
    signature = base64.urlsafe_b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).rstrip(b"=").decode()
    return f"{signing_input}.{signature}"


HEADER = '{"alg":"ES256","kid":"k1","typ":"JWT"}'


def payload(extra: str = "", first: str = "") -> str:
    """The claims of a good token; `first` goes before them (so the good value is the last one, the
    one Python's parser kept), `extra` after."""
    now = int(time.time())
    base = f'"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"alice","agent_id":"bot-1","exp":{now + 300},"iat":{now}'
    return "{" + first + base + extra + "}"


async def test_the_signing_helper_makes_tokens_the_gateway_accepts() -> None:
    identity = await verifier().verify(signed(HEADER, payload(',"groups":["analysts"]')))
    assert (identity.agent_id, identity.groups) == ("bot-1", ("analysts",))


@pytest.mark.parametrize(
    ("header", "claims", "member", "part"),
    [
        # The gateway used the last `aud`; a reader keeping the first sees a token for another service.
        (HEADER, lambda: payload(first='"aud":"https://other.example",'), "aud", "payload"),
        (HEADER, lambda: payload(first=f'"exp":{int(time.time()) - 3600},'), "exp", "payload"),
        (HEADER, lambda: payload(',"groups":["admins"],"groups":["analysts"]'), "groups", "payload"),
        (HEADER, lambda: payload(first='"agent_id":"admin-bot",'), "agent_id", "payload"),
        (HEADER, lambda: payload(first='"iss":"https://evil.example",'), "iss", "payload"),
        ('{"alg":"none","alg":"ES256","kid":"k1"}', payload, "alg", "header"),
        ('{"alg":"ES256","kid":"k2","kid":"k1"}', payload, "kid", "header"),
        ('{"alg":"ES256","kid":"k1","crit":["exp"],"crit":[]}', payload, "crit", "header"),
        # Nested objects too: a confirmation key or any structured claim read two ways.
        (HEADER, lambda: payload(',"cnf":{"jkt":"a","jkt":"b"}'), "jkt", "payload"),
        (HEADER, lambda: payload(',"ext":{"roles":[{"name":"x","name":"admin"}]}'), "name", "payload"),
        ('{"alg":"ES256","kid":"k1","jwk":{"kty":"EC","kty":"RSA"}}', payload, "kty", "header"),
    ],
    ids=[
        "payload-aud",
        "payload-exp",
        "payload-groups",
        "payload-agent-id",
        "payload-iss",
        "header-alg",
        "header-kid",
        "header-crit",
        "nested-object",
        "object-in-a-list",
        "nested-in-header",
    ],
)
async def test_a_duplicated_member_is_refused_with_its_name(header: str, claims: Any, member: str, part: str) -> None:
    token = signed(header, claims())
    with pytest.raises(Unauthenticated) as refused:
        await verifier().verify(token)
    assert refused.value.description.startswith(f"token {part} has a duplicated member {member!r}")


async def test_the_refusal_is_a_401_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from server.auth.middleware import BearerAuthMiddleware
    from server.metrics import Metrics

    app = BearerAuthMiddleware(Starlette(), verifier(), "http://127.0.0.1/.well-known/x", Metrics())
    token = signed(HEADER, payload(',"groups":["analysts"],"groups":["admins"]'))
    response = TestClient(app).post("/mcp", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert "duplicated member 'groups'" in response.headers["www-authenticate"]


@pytest.mark.parametrize(
    "text",
    ['{"a":NaN}', '{"a":Infinity}', '{"a":-Infinity}', '{"exp":1e400}', '{"exp":-1e400}',
     '{"n":9223372036854775808}', '{"n":-9223372036854775809}', '{"sub":"admins\\ud800"}', '{"\\udfff":1}',
     '{"g":["a",{"b":"\\ud83d"}]}'],
)  # fmt: skip
def test_what_readers_would_read_differently_is_refused(text: str) -> None:
    with pytest.raises(AmbiguousJson):
        loads_strict(text)


def test_ordinary_json_reads_as_usual() -> None:
    text = '{"exp":1796117642,"f":1.5e3,"n":-9223372036854775808,"s":"\\ud83d\\ude00 caf\\u00e9","l":[{}]}'
    assert loads_strict(text) == {"exp": 1796117642, "f": 1500.0, "n": -(2**63), "s": "\U0001f600 caf\u00e9", "l": [{}]}


async def test_an_expiry_that_overflows_to_infinity_is_refused() -> None:
    """`1e400` is infinity to Python: without the check this token would never expire."""
    claims = f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"alice","agent_id":"bot-1","exp":1e400}}'
    with pytest.raises(Unauthenticated, match="number 1e400 overflows"):
        await verifier().verify(signed(HEADER, claims))


def test_a_jwks_with_a_duplicated_member_is_refused() -> None:
    key = KEY.as_dict(private=False)
    body = '{"keys":[{' + ",".join(f'"{k}":"{v}"' for k, v in key.items()) + ',"kid":"other"}]}'
    with pytest.raises(KeyUnavailable, match="duplicated member 'kid'"):
        parse_jwks(body, "test")
