"""The pipeline runner: runs the stages in order, and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog

from server.call import Call
from server.errors import AfterInvoke, CastellanError, Denied, InternalError
from server.in_flight import WORKING
from server.metrics import Metrics

log = structlog.get_logger("castellan.pipeline")


class Stage(Protocol):
    """One step of the pipeline: reads what it needs from `call`, returns it with what it learned.

    A stage that refuses the call raises a `CastellanError`; it never builds an MCP response. One
    that mostly waits (for the tool, for a human) says so with a class attribute `waits = True`.
    """

    name: str

    async def run(self, call: Call) -> Call: ...


OnStop = Callable[[Call], Awaitable[None]]
CANCELLED = "the call was cancelled before the tool ran (the client went away, or the gateway is stopping)"


_FINISHING: set[asyncio.Future[object]] = set()


async def _shielded(work: Awaitable[object]) -> None:
    """Finish `work` even though the caller is being cancelled (a long wait, such as for an approval,
    must not end without its record); if cancelled again meanwhile, it finishes in the background."""
    task = asyncio.ensure_future(work)
    _FINISHING.add(task)
    task.add_done_callback(_FINISHING.discard)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(task)


class Pipeline:
    """Runs `stages` in order. A stage that raises stops the run: the error is put on the call, each
    `on_stop` handler sees it (the meter releases its reservation, the audit records the denial), and
    the call comes back with `error` set.

    Any exception that is not a `CastellanError` is a bug and becomes an `InternalError`: never an allow.

    A call cancelled before the tool ran (the client went away mid-wait) is stopped the same way, with the
    handlers run to the end, and the cancellation then goes on.

    Once the `invoke` stage has completed the tool has run, so a later failure is never a denial: it
    becomes `AfterInvoke` (the result is returned when only the last stage failed, the outcome write,
    and withheld when a stage that shapes the result did not finish), and the stop handlers settle
    the tokens instead of releasing them.
    """

    def __init__(self, stages: Sequence[Stage], metrics: Metrics, on_stop: Sequence[OnStop] = ()) -> None:
        self.stages = tuple(stages)
        self._metrics = metrics
        self._on_stop = tuple(on_stop)
        self._histograms = {s.name: metrics.stage_seconds.labels(s.name) for s in self.stages}
        # Each stage with its histogram's observe and whether it waits (server/in_flight), looked up
        # once, not per stage of every call.
        self._steps = tuple(
            (s, self._histograms[s.name].observe, bool(getattr(s, "waits", False))) for s in self.stages
        )

    async def run(self, call: Call) -> Call:
        WORKING.calls += 1
        try:
            return await self._run(call)
        finally:
            WORKING.calls -= 1

    async def _run(self, call: Call) -> Call:
        working = WORKING
        invoked = False
        clock = time.perf_counter
        for stage, observe, waits in self._steps:
            started = clock()
            try:
                if waits:  # not worked on while it waits for the tool, or a human
                    working.calls -= 1
                    try:
                        call = await stage.run(call)
                    finally:
                        working.calls += 1
                else:
                    call = await stage.run(call)
            except asyncio.CancelledError:
                if not invoked and stage.name != "invoke":  # nothing ran: record the refusal, free what it held
                    await _shielded(self._stop(call, Denied(stage.name, CANCELLED), stage.name, started))
                raise
            except CastellanError as exc:
                error: CastellanError = self._after_invoke(stage, exc) if invoked else exc
                return await self._stop(call, error, stage.name, started)
            except Exception as exc:
                log.exception("stage_failed", stage=stage.name, call_id=call.call_id)
                error = InternalError(stage.name, f"internal error in {stage.name} ({type(exc).__name__})")
                return await self._stop(
                    call, self._after_invoke(stage, error) if invoked else error, stage.name, started
                )
            elapsed = clock() - started
            observe(elapsed)
            call = call.timed(stage.name, elapsed)
            invoked = invoked or stage.name == "invoke"
        return call

    def _after_invoke(self, stage: Stage, exc: CastellanError) -> CastellanError:
        if isinstance(exc, AfterInvoke):
            return exc
        withheld = stage is not self.stages[-1]
        what = "its result is withheld" if withheld else "its result is returned"
        reasons = [f"the tool ran, then {stage.name} failed ({'; '.join(exc.reasons)}): {what}"]
        return AfterInvoke(stage.name, *reasons, withheld=withheld, decision=exc.decision)

    async def _stop(self, call: Call, exc: CastellanError, stage: str, started: float) -> Call:
        elapsed = time.perf_counter() - started
        self._histograms[stage].observe(elapsed)
        return await self.refuse(call.timed(stage, elapsed), exc)

    async def refuse(self, call: Call, exc: CastellanError) -> Call:
        """Stop `call` with `exc` without running (more) stages: also for a call refused before the
        pipeline could start (a request the edge could not read), so that it is recorded like any
        other. Every `on_stop` handler runs, even if one before it fails."""
        call = call.evolve(error=exc, decision=exc.decision or call.decision, grants=exc.grants or call.grants)
        for handler in self._on_stop:
            try:
                await handler(call)
            except Exception:
                log.exception("on_stop_failed", call_id=call.call_id)
        return call
