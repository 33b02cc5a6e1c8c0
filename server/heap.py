"""The cyclic garbage collector, set for a long-lived serving process: `settle` once start-up is done.

A governed call leaves no reference cycles behind (tests/unit/server/test_call_garbage.py pins it), so
its objects are freed by reference counting as soon as the request is done with them, and a collection
of the youngest generation finds nothing to free. At CPython's default threshold (a collection every
700 net allocations) the gateway still ran one every ~8 calls at concurrency 16, promoting the objects
of the calls in flight to older generations that later collections walked again: 141 ms of the event
loop's CPU per 6,000 calls (283 ms while each call still left ~50 objects in cycles). At
`YOUNG_THRESHOLD` it runs about once per 1,000 calls, 8 ms per 6,000 (measured, 2026 era, built-in echo).
What still makes cycles (an exception's traceback, a library's own) is freed as before, only later: at
most `YOUNG_THRESHOLD` objects' worth of young garbage waits for it.

Start-up's objects are frozen because each full collection walked all of them: ~190 ms of the event
loop's CPU once every couple of thousand calls before (measured, 2026 era); the gateway's RSS was
365-368 MB either way after 2,300 calls.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Net allocations of container objects between collections of the youngest generation (CPython: 700)."""


def settle() -> None:
    """Collects once, moves every object alive now out of the collector's sight (`gc.freeze`: modules,
    settings, compiled schemas and policies, caches, what start-up built and keeps for the process's
    life), and raises the youngest generation's threshold to `YOUNG_THRESHOLD`. An object frozen here
    that later becomes cyclic garbage is never freed (start-up's objects are meant to live as long as
    the process)."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
