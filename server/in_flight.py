"""How many governed calls this thread's event loop is working on: a hint for where a call's CPU-heavy
work runs, never a limit (the meter's `concurrent_calls` is the limit).

The pipeline counts a call from its first stage to its last, except while a stage that waits runs
(`waits = True`: the tool, a human approval), since a call waiting there takes no CPU here. The
embedded policy engine reads it: with another call being worked on, an evaluation that runs without
the GIL (OPA's library) goes to a worker thread, and the loop serves the other call on the other core
meanwhile; alone, it runs inline, where a hand-off would only add its wake-ups. The audit outbox
asks `alone()`, which also counts the HTTP requests being served: a call with nothing else on its loop
commits its decision on the loop's thread (server/sqlite.py, `transact(inline=True)`), and with anything
else (another request being parsed, another call waiting for its tool) hands the commit to the writer
thread, so the loop serves the rest during the fsync. Per thread, as each
event loop is: a loop in another thread (a test client's, a worker's) counts its own calls.
"""

from __future__ import annotations

import threading
from collections.abc import Collection


class Working(threading.local):
    calls = 0
    """Calls counted on this thread now (a class default: each thread starts at 0)."""
    requests = 0
    """HTTP POST requests this thread's loop is serving now, from the gateway app's entry to its return
    (server/gateway_app.py): a call's own request included, one waiting for its tool too, and requests
    read but not yet in the pipeline (parsing, authenticating) or past it (the response's writing)."""
    open_connections: Collection[object] = ()
    """The open connections of the server on this thread's loop: uvicorn's own set of them, which
    server/http_protocol.py hands over at the first connection. Under concurrent load the
    requests of other connections may still be in the kernel's buffers, unread, while one request is
    served: a loop that then runs that request straight through (its commit inline too) would go on
    reading one request at a time. Their connections are what it can see."""


WORKING = Working()
MAX_QUIET_CONNECTIONS = 2
"""`alone()` also asks for at most this many open connections: one agent's (a 2025-era client may hold
a second, its GET stream). Behind a load balancer holding many idle connections it is never alone."""


def others_working() -> bool:
    """Another call than the caller's is being worked on by this thread's loop."""
    return WORKING.calls > 1


def alone() -> bool:
    """The caller's call is all this thread's loop has to serve: no other call in its pipeline, no other
    request anywhere in it, and no more connections than one agent holds (stricter than
    `not others_working()`)."""
    working = WORKING
    return working.calls <= 1 and working.requests <= 1 and len(working.open_connections) <= MAX_QUIET_CONNECTIONS
