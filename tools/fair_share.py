"""Fair scheduling of a few worker slots between agent identities.

At most `per_identity` slots go to one identity at once, so one agent's heavy queries can never hold
every worker; when a slot frees, waiting identities are served in turn (round-robin), so an agent
with one small query is not queued behind another agent's backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator


class FairShare:
    def __init__(self, slots: int, per_identity: int) -> None:
        self.slots = slots
        self.per_identity = max(1, min(per_identity, slots))
        self._free = slots
        self._running: Counter[str] = Counter()
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    def running(self, who: str) -> int:
        return self._running[who]

    def _grantable(self, who: str) -> bool:
        return self._free > 0 and self._running[who] < self.per_identity

    def _grant(self, who: str) -> None:
        self._free -= 1
        self._running[who] += 1

    def _release(self, who: str) -> None:
        self._free += 1
        self._running[who] -= 1
        if self._running[who] <= 0:
            del self._running[who]
        self._dispatch()

    def _dispatch(self) -> None:
        for who in list(self._waiting):
            if not self._grantable(who):
                continue
            queue = self._waiting[who]
            while queue and queue[0].done():
                queue.popleft()
            if not queue:
                del self._waiting[who]
                continue
            self._grant(who)
            queue.popleft().set_result(None)
            # this identity goes to the back of the line
            if queue:
                self._waiting.move_to_end(who)
            else:
                del self._waiting[who]
            if self._free == 0:
                return

    @contextlib.asynccontextmanager
    async def slot(self, who: str) -> AsyncIterator[None]:
        """Holds one slot for `who` while the block runs (waits for its turn first)."""
        if self._grantable(who) and not self._waiting:
            self._grant(who)
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(who, deque()).append(future)
            self._dispatch()
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release(who)  # granted just as it was cancelled: give it back
                raise
        try:
            yield
        finally:
            self._release(who)
