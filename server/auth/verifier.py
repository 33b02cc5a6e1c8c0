"""Bearer JWT verification: signature, algorithm allow-list, issuer, audience, expiry; claims to `Identity`."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from joserfc import jws, jwt
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import KeySet

from server.auth.keys import KeySource, KeyUnavailable
from server.auth.strict_json import AmbiguousJson, compact_parts
from server.errors import Unauthenticated
from server.identity import Identity
from server.settings import ClaimNames

# Never accepted, whatever the configuration says: unsigned tokens and shared-secret algorithms
# (an HS256 token "signed" with the issuer's public key is the classic confusion attack).
_FORBIDDEN_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})
_MAX_TOKEN_BYTES = 16_384


class TokenVerifier(Protocol):
    """Turns a bearer token into an `Identity`. Raises `Unauthenticated` with a reason a client can act on."""

    async def verify(self, token: str) -> Identity: ...


class JwtVerifier:
    """Verifies JWTs from one issuer against its keys (`KeySource`)."""

    def __init__(
        self,
        keys: KeySource,
        *,
        issuer: str,
        audience: str,
        algorithms: Sequence[str],
        claims: ClaimNames,
        leeway_seconds: int = 30,
        max_lifetime_seconds: int = 0,
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._algorithms = tuple(a for a in algorithms if a not in _FORBIDDEN_ALGORITHMS)
        self._claims = claims
        self._leeway = leeway_seconds
        self._max_lifetime = max_lifetime_seconds

    async def verify(self, token: str) -> Identity:
        if len(token) > _MAX_TOKEN_BYTES:
            raise Unauthenticated("token is too large")
        header, payload = _parts(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise Unauthenticated(f"token algorithm {alg!r} is not allowed")
        keys = await self._key_set(header.get("kid"))
        try:
            decoded = jwt.decode(token, keys, algorithms=self._algorithms)
        except BadSignatureError:
            raise Unauthenticated("token signature is invalid") from None
        except (JoseError, ValueError) as exc:
            raise Unauthenticated(f"token cannot be verified: {exc}") from None
        if decoded.claims != payload:  # the library read the payload as we did, or we trust neither
            raise Unauthenticated("token payload cannot be read unambiguously")
        claims = payload
        self._check_claims(claims)
        return self._identity(claims)

    async def _key_set(self, kid: Any) -> KeySet:
        try:
            keys = await self._keys.key_set()
            if kid is None:
                return keys
            if not isinstance(kid, str):
                raise Unauthenticated("token key id is not a string")
            if not _has_kid(keys, kid):
                keys = await self._keys.key_set(refresh=True)
        except KeyUnavailable as exc:
            raise Unauthenticated(f"issuer keys are unavailable: {exc}") from None
        if not _has_kid(keys, kid):
            raise Unauthenticated(f"token key id {kid!r} is unknown")
        return keys

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        now = time.time()
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise Unauthenticated("token has no expiry (exp)")
        if exp + self._leeway < now:
            raise Unauthenticated("token has expired")
        if self._max_lifetime:
            iat = claims.get("iat")
            if not isinstance(iat, int | float) or isinstance(iat, bool):
                raise Unauthenticated("token has no issue time (iat), so its lifetime cannot be bounded")
            if exp - iat > self._max_lifetime:
                raise Unauthenticated(f"token lifetime {int(exp - iat)}s exceeds the {self._max_lifetime}s accepted")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf - self._leeway > now:
            raise Unauthenticated("token is not valid yet (nbf)")
        if claims.get("iss") != self._issuer:
            raise Unauthenticated(f"token issuer {claims.get('iss')!r} is not trusted")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self._audience not in audiences:
            raise Unauthenticated(f"token audience is not this gateway ({self._audience}): it is for {aud!r}")

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        names = self._claims
        agent_id, agent_claim = "", ""
        for claim in (names.agent_id, *names.agent_id_fallbacks):
            agent_id, agent_claim = _string(claims.get(claim)), claim
            if agent_id:
                break
        if not agent_id:
            raise Unauthenticated(f"token names no agent (claim {names.agent_id!r})")
        exp = claims.get("exp")
        return Identity(
            agent_id=agent_id,
            subject=_string(claims.get(names.subject)) or agent_id,
            issuer=self._issuer,
            groups=_strings(claims.get(names.groups)),
            scopes=_strings(claims.get(names.scopes)),
            expires_at=int(exp) if isinstance(exp, int | float) else None,
            subject_kind=None if names.subject_kind == "auto" else names.subject_kind,
            # Typed from the claim it came from: an agent named only by `sub` is its subject, not a client.
            agent_is_subject=agent_claim == names.subject,
        )


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload, read strictly (`strict_json`) before anything in them is trusted."""
    try:
        header, payload = compact_parts(token)
        jws.extract_compact(token.encode("ascii"))
    except AmbiguousJson as exc:
        raise Unauthenticated(f"{exc}: refused, since readers of the token could disagree on it") from None
    except (JoseError, ValueError, UnicodeEncodeError):
        raise Unauthenticated("token is not a well-formed JWT") from None
    return header, payload


def _has_kid(keys: KeySet, kid: str | None) -> bool:
    return kid is None or any(k.kid == kid for k in keys.keys)


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v for v in value.split() if v)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str) and v)
    return ()
