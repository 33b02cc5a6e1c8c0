"""Pipeline stages of the content guardrails: `guard` finds what the arguments hold before policy
decides; `guard_result` finds what the result holds and asks policy about it (`input.action == "result"`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from prometheus_client import CollectorRegistry, Counter

from server import content
from server.call import Call
from server.errors import Denied
from server.guardrails.detectors import Detector
from server.guardrails.scan import masked_output, scan_arguments, scan_result
from server.policy._input import result_input
from server.policy.engine import PolicyEngine
from server.registry import ToolOutput

if TYPE_CHECKING:
    from server.audit.redaction import Redactor
    from server.settings import GuardrailSettings

log = structlog.get_logger("castellan.guardrails")

# Above this many characters a scan runs in a worker thread, so one big payload does not hold
# the event loop (and every other call on it) for milliseconds.
_THREAD_CHARS = 32_768


def _detections_counter(registry: CollectorRegistry | None) -> Counter | None:
    if registry is None:
        return None
    return Counter(
        "castellan_guardrail_detections",
        "Places in arguments or results where guardrails found personal data or a secret, by where and kind.",
        ["where", "kind"],
        registry=registry,
    )


def _count(counter: Counter | None, found: Iterable[Mapping[str, Any]]) -> None:
    if counter is not None:
        for entry in found:
            counter.labels(entry["where"], entry["kind"]).inc()


def _size(value: Any) -> int:
    """Characters of text in `value`, stopping once past the thread threshold."""
    total, stack = 0, [value]
    while stack and total <= _THREAD_CHARS:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total


def _result_size(output: ToolOutput) -> int:
    return len(output.text) + _size(output.structured) + _size(list(output.content))


class GuardArgumentsStage:
    """Puts the detections in the call's arguments on the call, for `input.detections`.
    Never refuses a call itself: what a detection means is for policy to say."""

    name = "guard"

    def __init__(self, detector: Detector, registry: CollectorRegistry | None = None) -> None:
        self._detector = detector
        self._counter = _detections_counter(registry)

    @property
    def counter(self) -> Counter | None:
        return self._counter

    async def run(self, call: Call) -> Call:
        if not call.arguments:
            return call
        if _size(call.arguments) > _THREAD_CHARS:
            found = await anyio.to_thread.run_sync(scan_arguments, call.arguments, self._detector)
        else:
            found = scan_arguments(call.arguments, self._detector)
        if not found:
            return call
        _count(self._counter, found)
        return call.evolve(detections=found)


class GuardResultStage:
    """Scans the tool's result; when something is found, policy decides on it (`action` "result",
    `detections` those of the result): deny withholds the result (the tool has run, so the call is
    recorded as allowed and the agent told why it gets nothing), `redact_detections` masks the
    spans of the kinds it names, `flags` marks the outcome record. The result decision's other
    obligations are the call decision's business (already decided, and carried out by the
    obligations stage from the call's decision) and are not acted on twice."""

    name = "guard_result"

    def __init__(self, detector: Detector, engine: PolicyEngine, counter: Counter | None = None) -> None:
        self._detector = detector
        self._engine = engine
        self._counter = counter

    async def run(self, call: Call) -> Call:
        output = call.output
        if output is None or call.identity is None or call.tool is None:
            return call
        if _result_size(output) > _THREAD_CHARS:
            found = await anyio.to_thread.run_sync(scan_result, output, self._detector)
        else:
            found = scan_result(output, self._detector)
        if not found:
            return call
        _count(self._counter, found)
        decision = await self._engine.decide(result_input(call, found))
        if not decision.allow:
            raise Denied(self.name, *(decision.reasons or ("result refused by policy",)), decision=call.decision)
        call = call.evolve(result_detections=found, result_decision=decision)
        kinds = frozenset(decision.obligations.get("redact_detections", ()))
        if not kinds:
            return call
        if _result_size(output) > _THREAD_CHARS:
            masked = await anyio.to_thread.run_sync(masked_output, output, self._detector, kinds)
        else:
            masked = masked_output(output, self._detector, kinds)
        if masked.returned is None:  # what the tool returned, for the audit record
            masked = replace(masked, returned=content.summary(content.parts(output)))
        log.info("result_masked", call_id=call.call_id, tool=call.tool_name, kinds=sorted(kinds))
        return call.evolve(output=masked)


def guard_stages_for(
    settings: GuardrailSettings, redactor: Redactor, engine: PolicyEngine, registry: CollectorRegistry | None
) -> tuple[list[GuardArgumentsStage], list[GuardResultStage]]:
    """The guard stages the settings ask for: those before policy, and those after the tool ran."""
    if not settings.enabled:
        return [], []
    detector = Detector(redactor.scanner, settings.phone_regions, settings.kinds)
    arguments = GuardArgumentsStage(detector, registry)
    after = [GuardResultStage(detector, engine, arguments.counter)] if settings.results else []
    return [arguments], after
