"""The embedded policy engine: Rego decided in this process, exactly as OPA decides it.

Two evaluators, chosen at start-up and named in the start-up log and `castellan policy check`:

- `opa-library`: OPA's own evaluator (server/policy/golib, OPA v1.22.2) as a shared library, built by
  scripts/build-opa-library. Exact by construction; a few builtins are refused or bounded.
- `regorus`: where the library is not built (no Go). Only policies within the verified subset are
  accepted (server/policy/regorus_subset.py); any other is refused at load, naming the builtin.

Neither can take the process down: evaluation errors and panics become denials with a reason.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson
import structlog

from server.errors import BackendUnavailable, ConfigError
from server.in_flight import others_working
from server.policy import inprocess_opa
from server.policy._input import input_problem
from server.policy._result import EVALUATION_FAILED, to_decision
from server.policy._thread_engines import drop, engine_for, new_owner
from server.policy.bundle import PolicyBundle, log_mask_bundle
from server.policy.engine import Decision, LoadReport, LogMask
from server.policy.regorus_subset import RegorusPolicy, _clean, syntax_check

log = structlog.get_logger("castellan.policy")
_STOP = None
EVALUATORS = ("opa-library", "regorus")

# What an evaluation gives: ok, the raw result or the error, the CPU seconds it took, and the decision
# log's mask when it was evaluated with it (`(value,)`), else None.
_Outcome = tuple[bool, Any, float, "tuple[Any] | None"]
# A job: the input document (as JSON, and itself), the future to answer, and the loop that owns the future.
_Job = tuple[str, Any, "asyncio.Future[_Outcome]", asyncio.AbstractEventLoop]


class Compiled(Protocol):
    """A bundle compiled for one entrypoint by one evaluator. `document` is `document_json` parsed,
    when the caller has it (it spares the evaluator parsing it again)."""

    def evaluate(self, document_json: str, document: Any = None) -> tuple[bool, Any]: ...


def default_evaluator() -> str:
    """`opa-library` when the library is built, else `regorus`."""
    return "opa-library" if inprocess_opa.available() else "regorus"


def compile_policy(
    bundle: PolicyBundle,
    entrypoint: str,
    evaluator: str = "",
    timeout_seconds: float = 1.0,
    mask: PolicyBundle | None = None,
) -> Compiled:
    """`bundle` compiled by `evaluator` (default: `default_evaluator()`). Raises `ConfigError` naming the
    file, and the builtin or construct, when the evaluator refuses it. With `mask` (the OPA library
    only), each evaluation evaluates the decision log's mask too (`inprocess_opa.CompiledPolicy`)."""
    evaluator = evaluator or default_evaluator()
    if evaluator == "opa-library":
        return inprocess_opa.CompiledPolicy(bundle, entrypoint, timeout_seconds, mask)
    if evaluator == "regorus":
        return RegorusPolicy(bundle, entrypoint)
    raise ConfigError(f"unknown embedded evaluator {evaluator!r}; choose from {list(EVALUATORS)}")


def _answer(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the caller gave up (cancelled)
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _evaluate(compiled: Compiled, document_json: str, document: Any = None) -> _Outcome:
    """(ok, raw result or error message, CPU seconds this thread spent evaluating, the decision log's
    mask when evaluated with it). Never raises.

    CPU time, not wall time: on a loaded machine the wall time of a 100 µs evaluation is mostly
    waiting for a core, which a worker thread does not shorten; measured by the wall clock, load
    alone pushed every decision onto the ~190 µs thread hop and made it slower still."""
    started = time.thread_time()
    mask: tuple[Any] | None = None
    try:
        if isinstance(compiled, inprocess_opa.CompiledPolicy):
            ok, value, mask = compiled.evaluate_logged(document_json)
        else:
            ok, value = compiled.evaluate(document_json, document)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # anything at all is a deny, never a crash
        ok, value, mask = False, f"{type(exc).__name__}: {_clean(exc)}", None
    return ok, value, time.thread_time() - started, mask


def input_json(document: Any) -> str:
    """The policy input as JSON text, read by the evaluators as `json.dumps`'s would be: orjson's (~10x
    faster) when the document is plain JSON values (exact `str`, `int`, `float`, `bool`, `None`, `dict`,
    `list`, `tuple`) with every float finite, else `json.dumps`'s own. orjson writes NaN and +-Infinity
    as `null`, where json.dumps writes `NaN`/`Infinity`, which OPA and regorus refuse (an evaluation
    error, so a deny: fail closed), and that must stay so; and orjson writes values json.dumps refuses
    (dataclasses, datetimes, UUIDs), so anything but plain values takes json.dumps and fails as before."""
    if not _plain(document):
        return json.dumps(document)
    try:
        return orjson.dumps(document).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError: an integer beyond 64 bits, a non-string key
        return json.dumps(document)


def _plain(value: Any) -> bool:
    """`value` is made of plain JSON values only (exact types: a subclass may encode differently) and
    no float in it is NaN or infinite. This walk is most of input_json's cost."""
    stack = [value]
    pop, extend = stack.pop, stack.extend
    while stack:
        item = pop()
        kind = type(item)
        if kind is str or kind is int or kind is bool or item is None:
            continue
        if kind is dict:
            extend(item.values())
        elif kind is list or kind is tuple:
            extend(item)
        elif kind is float:
            if not math.isfinite(item):
                return False
        else:
            return False
    return True


def _poisoned(compiled: Compiled) -> bool:
    return bool(getattr(compiled, "poisoned", False))


def _serve(jobs: queue.SimpleQueue[_Job | None], make: Callable[[], Compiled]) -> None:
    """A worker thread's life: it owns its compiled policy (regorus engines may not cross threads, not
    even to be freed), decides jobs until told to stop, then drops it itself. A policy that panicked
    is rebuilt before the next job."""
    compiled = make()
    while (job := jobs.get()) is not _STOP:
        document_json, document, future, loop = job
        loop.call_soon_threadsafe(_answer, future, True, _evaluate(compiled, document_json, document))
        if _poisoned(compiled):
            del compiled
            compiled = make()
    del compiled


class _Workers:
    """Threads deciding with one bundle. Stopping lets queued jobs finish first (the queue is FIFO)."""

    def __init__(self, bundle: PolicyBundle, make: Callable[[], Compiled], count: int, mask_version: str = "") -> None:
        self.bundle = bundle
        self.make = make
        self.mask_version = mask_version
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=_serve, args=(self.jobs, make), name=f"rego-{i}", daemon=True) for i in range(count)
        ]
        for thread in self.threads:
            thread.start()
        # Stop the threads even if nobody calls stop(); they free their engines on their own threads.
        self.stop = weakref.finalize(self, _stop_workers, self.jobs, count)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)


class EmbeddedEngine:
    """Decides in-process with the `opa-library` evaluator, or `regorus` (verified subset) without it.

    Where: an evaluation is short (~80-150 µs of CPU for the default policy), so a decision runs on
    the event loop's thread while the running average of their CPU time stays under `inline_max_us`,
    and on `workers` threads when the policy is slower. The OPA library releases the GIL while it
    evaluates, so while the loop is working on another call too (`server.in_flight`) its decision goes
    to a worker thread as well: the loop serves the other call while Go evaluates on the other core
    (alone, the hand-off would only add latency). Regorus holds the GIL and shares the interpreter in
    5 ms slices, so it stays inline whatever else runs.

    With `log_masks` (the OPA library; the gateway sets it when the decision log is on), each decision
    carries the decision log's mask for its event (`Decision.log_mask`), evaluated in the same library
    call on the input parsed once, instead of a second evaluation by the decision log.

    The input is validated against the decision-input schema first; an invalid input, an undefined
    entrypoint, an evaluation error, a bound exceeded, a deadline (`timeout_seconds`, OPA library) or
    a panic is a deny with the reason, never an exception. `load` compiles the new bundle first and
    swaps only when it compiles: a broken edit, or one outside what the evaluator accepts, leaves the
    last good policy.
    """

    name = "embedded"

    def __init__(
        self,
        bundle: PolicyBundle,
        entrypoint: str = "data.castellan.gateway.decision",
        workers: int = 1,
        inline_max_us: float = 250.0,
        *,
        evaluator: str = "",
        timeout_seconds: float = 1.0,
        log_masks: bool = False,
    ) -> None:
        self.evaluator = evaluator or default_evaluator()
        self._log_masks = log_masks and self.evaluator == "opa-library"
        self._entrypoint = entrypoint
        self._timeout = timeout_seconds
        self._count = workers
        self._workers = self._start(bundle)  # refuses a bundle that does not compile, with the file named
        self._closed = False
        self._inline_max = inline_max_us / 1e6
        self._average = 0.0
        self._off_gil = self.evaluator == "opa-library"  # evaluates without the GIL: a thread runs it in parallel
        self._owner = new_owner()  # inline regorus engines live with the thread that used them

    def _start(self, bundle: PolicyBundle) -> _Workers:
        mask = log_mask_bundle(bundle) if self._log_masks else None
        first: Compiled | None = compile_policy(bundle, self._entrypoint, self.evaluator, self._timeout, mask)
        shared = first if self.evaluator == "opa-library" else None  # one compiled policy for every thread
        del first  # regorus: free it here, on this thread; each thread compiles its own

        def make() -> Compiled:
            return shared or compile_policy(bundle, self._entrypoint, self.evaluator, self._timeout)

        return _Workers(bundle, make, self._count, mask.version if mask is not None else "")

    @property
    def policy_version(self) -> str:
        return self._workers.bundle.version

    async def load(self, bundle: PolicyBundle) -> LoadReport:
        try:
            new = self._start(bundle)
        except ConfigError as exc:
            return LoadReport(loaded=False, policy_version=self.policy_version, errors=(str(exc),))
        old, self._workers = self._workers, new
        old.stop()
        return LoadReport(loaded=True, policy_version=bundle.version)

    async def decide(self, document: Mapping[str, Any]) -> Decision:
        workers = self._workers
        version = workers.bundle.version
        decision_id = uuid.uuid4().hex
        started = time.perf_counter()
        problem = input_problem(document)
        if problem is not None:
            return to_decision(
                {"allow": False, "reasons": [problem]},
                policy_version=version,
                engine=self.name,
                decision_id=decision_id,
            )
        if self._closed:
            raise BackendUnavailable("policy", "policy engine unavailable (closed)")
        document_json = input_json(document)
        if self._inline_max > 0 and self._average <= self._inline_max and not (self._off_gil and others_working()):
            compiled = engine_for(self._owner, version, workers.make)
            ok, raw, seconds, mask = _evaluate(compiled, document_json, document)
            if _poisoned(compiled):
                drop(self._owner)  # here, on the thread that made it; the next call builds a fresh one
        else:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[_Outcome] = loop.create_future()
            workers.jobs.put((document_json, document, future, loop))
            ok, raw, seconds, mask = await future
        self._average = 0.9 * self._average + 0.1 * seconds
        if not ok:  # evaluation error (a builtin given a wrong type, a bound, a panic): deny
            log.warning("policy_evaluation_failed", engine=self.name, evaluator=self.evaluator, error=str(raw))
            raw = {"allow": False, "reasons": [EVALUATION_FAILED]}
        eval_ms = (time.perf_counter() - started) * 1000
        log_mask = LogMask(workers.mask_version, document, raw, mask[0]) if mask is not None else None
        return to_decision(
            raw, policy_version=version, engine=self.name, decision_id=decision_id, eval_ms=eval_ms, log_mask=log_mask
        )

    async def check(self) -> None:
        if self._closed or not self._workers.alive():
            raise BackendUnavailable("policy", "policy engine unavailable (worker stopped)")

    async def close(self) -> None:
        self._closed = True
        self._workers.stop()
        drop(self._owner)


def _stop_workers(jobs: queue.SimpleQueue[_Job | None], workers: int) -> None:
    for _ in range(workers):
        jobs.put(_STOP)


class RuleEvaluator:
    """A bundle that evaluates any rule with the embedded evaluator, in regorus's calling style
    (`set_input_json`, then `eval_rule_as_json`): what the decision log's mask uses, so the mask is
    exactly OPA's too. Each rule is compiled on first use; a rule that the evaluator refuses, or that
    fails to evaluate, raises (`ConfigError`, `RuntimeError`)."""

    def __init__(self, bundle: PolicyBundle, evaluator: str = "") -> None:
        self._bundle = bundle
        self._evaluator = evaluator or default_evaluator()
        self._rules: dict[str, Compiled] = {}
        self._input = "null"
        if self._evaluator == "regorus":  # a syntax check now, as before (the OPA engine relies on it)
            syntax_check(bundle)

    def set_input_json(self, document_json: str) -> None:
        self._input = document_json

    def eval_rule_as_json(self, rule: str) -> str:
        compiled = self._rules.get(rule)
        if compiled is None:
            compiled = self._rules[rule] = compile_policy(self._bundle, rule, self._evaluator)
        ok, value, _, _ = _evaluate(compiled, self._input)
        if not ok:
            raise RuntimeError(f"{rule}: {value}")
        if _poisoned(compiled):
            del self._rules[rule]
        return '"<undefined>"' if value is None else json.dumps(value)


def compile_bundle(bundle: PolicyBundle) -> RuleEvaluator:
    """`bundle` ready to evaluate any of its rules; raises `ConfigError` when it does not compile.
    Like a regorus engine, keep it on the thread that made it (_thread_engines)."""
    return RuleEvaluator(bundle)
