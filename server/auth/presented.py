"""The caller's own bearer token, kept in memory only for exchanging it (RFC 8693) for an upstream's token."""

from __future__ import annotations

import time
from collections import OrderedDict

from server.identity import Identity


class PresentedTokens:
    """The last verified token each identity presented, until it expires. Bounded LRU, memory only.

    Only built when an upstream uses token exchange: the token is the exchange's `subject_token` and goes
    to the token service alone, never to an upstream. Two tokens of one identity are interchangeable
    (same subject, scopes and expiry), so the latest stands for both."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._max_entries = max_entries
        self._tokens: OrderedDict[Identity, str] = OrderedDict()

    def remember(self, identity: Identity, token: str) -> None:
        self._tokens[identity] = token
        self._tokens.move_to_end(identity)
        if len(self._tokens) > self._max_entries:
            self._tokens.popitem(last=False)

    def token_of(self, identity: Identity) -> str | None:
        token = self._tokens.get(identity)
        if token is not None and identity.expires_at is not None and identity.expires_at <= time.time():
            del self._tokens[identity]
            return None
        return token
