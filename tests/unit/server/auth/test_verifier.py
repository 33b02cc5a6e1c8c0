from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from server.auth.keys import KeyUnavailable, StaticKeys
from server.auth.verifier import JwtVerifier
from server.errors import Unauthenticated
from server.settings import ClaimNames

pytestmark = pytest.mark.anyio

ISSUER = "https://issuer.example"
AUDIENCE = "http://127.0.0.1:8750/mcp"
KEY = ECKey.generate_key("P-256", parameters={"kid": "k1"})
PUBLIC = KeySet([ECKey.import_key(KEY.as_dict(private=False))])


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "agent_id": "bot-1", "exp": now + 300, "iat": now}
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def sign(payload: dict[str, Any], key: Any = KEY, header: dict[str, Any] | None = None) -> str:
    return jwt.encode(header or {"alg": "ES256", "kid": key.kid}, payload, key)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def verifier(keys: Any = None, **kwargs: Any) -> JwtVerifier:
    return JwtVerifier(
        keys or StaticKeys(PUBLIC),
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=["ES256", "RS256"],
        claims=kwargs.pop("claims", ClaimNames()),
        leeway_seconds=5,
    )


async def test_a_valid_token_gives_the_identity_from_its_claims() -> None:
    token = sign(claims(groups=["analysts", "ops"], scope="mcp tools:call"))
    identity = await verifier().verify(token)
    assert identity.agent_id == "bot-1"
    assert identity.subject == "alice"
    assert identity.issuer == ISSUER
    assert identity.groups == ("analysts", "ops")
    assert identity.scopes == ("mcp", "tools:call")


async def test_claim_names_are_configurable() -> None:
    names = ClaimNames(agent_id="appid", groups="roles", scopes="scp")
    token = sign(claims(agent_id=None, appid="app-7", roles=["r1"], scp=["a", "b"]))
    identity = await verifier(claims=names).verify(token)
    assert (identity.agent_id, identity.groups, identity.scopes) == ("app-7", ("r1",), ("a", "b"))


async def test_agent_id_falls_back_to_azp_then_client_id() -> None:
    identity = await verifier().verify(sign(claims(agent_id=None, azp="client-9")))
    assert identity.agent_id == "client-9"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        # Built when the test runs (not at collection: a long suite would let the times drift).
        (lambda: claims(exp=int(time.time()) - 60), "token has expired"),
        (lambda: claims(aud="http://other.example/mcp"), "token audience is not this gateway"),
        (lambda: claims(iss="https://evil.example"), "token issuer 'https://evil.example' is not trusted"),
        (lambda: claims(exp=None), "token has no expiry"),
        (lambda: claims(nbf=int(time.time()) + 600), "token is not valid yet"),
    ],
    ids=["expired", "wrong-audience", "wrong-issuer", "no-expiry", "not-yet-valid"],
)
async def test_bad_claims_are_rejected_with_the_reason(payload: Callable[[], dict[str, Any]], message: str) -> None:
    with pytest.raises(Unauthenticated, match=message):
        await verifier().verify(sign(payload()))


async def test_audience_may_be_a_list_that_contains_the_gateway() -> None:
    identity = await verifier().verify(sign(claims(aud=["other", AUDIENCE])))
    assert identity.agent_id == "bot-1"


async def test_alg_none_is_rejected() -> None:
    token = f"{b64(json.dumps({'alg': 'none'}).encode())}.{b64(json.dumps(claims()).encode())}."
    with pytest.raises(Unauthenticated, match="algorithm 'none' is not allowed"):
        await verifier().verify(token)


async def test_hs256_signed_with_the_public_key_is_rejected() -> None:
    rsa = RSAKey.generate_key(2048, parameters={"kid": "r1"})
    public_pem = rsa.as_pem(private=False)
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': 'r1'}).encode())}.{b64(json.dumps(claims()).encode())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    keys = StaticKeys(KeySet([RSAKey.import_key(rsa.as_dict(private=False))]))
    v = JwtVerifier(keys, issuer=ISSUER, audience=AUDIENCE, algorithms=["RS256", "HS256"], claims=ClaimNames())
    with pytest.raises(Unauthenticated, match="algorithm 'HS256' is not allowed"):
        await v.verify(f"{signing_input}.{b64(signature)}")


async def test_a_bad_signature_is_rejected() -> None:
    other = ECKey.generate_key("P-256", parameters={"kid": "k1"})  # same kid, different key
    with pytest.raises(Unauthenticated, match="signature is invalid"):
        await verifier().verify(sign(claims(), key=other))


async def test_a_tampered_payload_is_rejected() -> None:
    header, _, signature = sign(claims()).split(".")
    forged = b64(json.dumps(claims(agent_id="admin-bot")).encode())
    with pytest.raises(Unauthenticated, match="signature is invalid"):
        await verifier().verify(f"{header}.{forged}.{signature}")


class CountingKeys:
    def __init__(self, keys: KeySet) -> None:
        self.keys, self.refreshes = keys, 0

    async def key_set(self, *, refresh: bool = False) -> KeySet:
        self.refreshes += refresh
        return self.keys


async def test_an_unknown_kid_is_rejected_after_one_refresh_of_the_keys() -> None:
    stranger = ECKey.generate_key("P-256", parameters={"kid": "k-unknown"})
    keys = CountingKeys(PUBLIC)
    with pytest.raises(Unauthenticated, match="key id 'k-unknown' is unknown"):
        await verifier(keys).verify(sign(claims(), key=stranger))
    assert keys.refreshes == 1


async def test_unreachable_issuer_keys_reject_the_token() -> None:
    class Down:
        async def key_set(self, *, refresh: bool = False) -> KeySet:
            raise KeyUnavailable("connection refused")

    with pytest.raises(Unauthenticated, match="issuer keys are unavailable"):
        await verifier(Down()).verify(sign(claims()))


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c", "é.é.é", "x" * 20_000])
async def test_malformed_tokens_are_rejected(token: str) -> None:
    with pytest.raises(Unauthenticated):
        await verifier().verify(token)


async def test_a_token_without_an_agent_is_rejected() -> None:
    with pytest.raises(Unauthenticated, match="names no agent"):
        await verifier().verify(sign(claims(agent_id=None, sub=None)))


async def test_a_verified_token_is_served_from_the_cache_until_it_expires() -> None:
    from server.auth.cache import CachedVerifier

    class Counting:
        def __init__(self) -> None:
            self.calls = 0

        async def verify(self, token: str) -> Any:
            self.calls += 1
            strict = JwtVerifier(
                StaticKeys(PUBLIC),
                issuer=ISSUER,
                audience=AUDIENCE,
                algorithms=["ES256"],
                claims=ClaimNames(),
                leeway_seconds=0,
            )
            return await strict.verify(token)

    inner = Counting()
    cached = CachedVerifier(inner, max_age=60)
    token = sign(claims())
    first, second = await cached.verify(token), await cached.verify(token)
    assert first == second
    assert inner.calls == 1
    short = sign(claims(exp=int(time.time()) + 1))
    await cached.verify(short)
    await anyio.sleep(1.1)  # past exp: the cache entry ends with the token
    with pytest.raises(Unauthenticated, match="expired"):
        await cached.verify(short)


async def test_a_failed_verification_is_not_cached() -> None:
    from server.auth.cache import CachedVerifier

    cached = CachedVerifier(verifier())
    bad = sign(claims(iss="https://evil"))
    for _ in range(2):
        with pytest.raises(Unauthenticated, match="not trusted"):
            await cached.verify(bad)
