"""How many governed calls this thread's event loop is working on: a hint for where a call's CPU-heavy
work runs, never a limit (the meter's `concurrent_calls` is the limit).

The pipeline counts a call from its first stage to its last, except while a stage that waits runs
(`waits = True`: the tool, a human approval), since a call waiting there takes no CPU here. The
embedded policy engine reads it: with another call being worked on, an evaluation that runs without
the GIL (OPA's library) goes to a worker thread, and the loop serves the other call on the other core
meanwhile; alone, it runs inline, where a hand-off would only add its wake-ups. Per thread, as each
event loop is: a loop in another thread (a test client's, a worker's) counts its own calls.
"""

from __future__ import annotations

import threading


class Working(threading.local):
    calls = 0
    """Calls counted on this thread now (a class default: each thread starts at 0)."""


WORKING = Working()


def others_working() -> bool:
    """Another call than the caller's is being worked on by this thread's loop."""
    return WORKING.calls > 1
