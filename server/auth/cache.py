"""A cache of verified tokens, so a client reusing its token does not pay for signature checks each call."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

from server.auth.verifier import TokenVerifier
from server.identity import Identity


class CachedVerifier:
    """Remembers the `Identity` of a token that verified, keyed by the token's SHA-256, until the token
    expires or `max_age` seconds pass (so a key removed from the issuer's JWKS stops working within
    `max_age`). Failures are never cached: each bad token is checked, and refused, again. Bounded LRU.
    """

    def __init__(self, inner: TokenVerifier, *, max_age: float = 60.0, max_entries: int = 10_000) -> None:
        self._inner = inner
        self._max_age = max_age
        self._max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()

    async def verify(self, token: str) -> Identity:
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = time.time()
        hit = self._entries.get(key)
        if hit is not None:
            if now < hit[0]:
                self._entries.move_to_end(key)
                return hit[1]
            del self._entries[key]
        identity = await self._inner.verify(token)
        until = now + self._max_age
        if identity.expires_at is not None:
            until = min(until, float(identity.expires_at))
        self._entries[key] = (until, identity)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return identity
