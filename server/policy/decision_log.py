"""Decision logs in OPA's event format, masked by the bundle's `data.system.log.mask` rules,
whichever engine decided (the mask is evaluated in-process for both: by the embedded engine with the
decision, else here), then redacted like every other sink; written through a buffer flushed within a
second, and rotated by size."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
import weakref
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog

from server import __version__, after_response
from server.audit.encoding import decode, encode_bytes
from server.audit.redaction import Redactor
from server.policy._input import RECOMPUTED, recorded_input
from server.policy._thread_engines import drop, engine_for, new_owner
from server.policy.bundle import MASK_RULE, PolicyBundle, log_mask_bundle
from server.policy.embedded import compile_bundle
from server.policy.engine import Decision

log = structlog.get_logger("castellan.policy")
__all__ = ["MASK_RULE", "DecisionLog", "apply_mask"]
_UNDEFINED = '"<undefined>"'
_BUFFER = 64 * 1024
LATER_SECONDS = 0.005
"""The latest a line queued by `emit_later` is written after its decision (sooner once its call is answered)."""


def apply_mask(event: dict[str, Any], mask: Any) -> dict[str, Any]:
    """OPA's masking: each string is a JSON pointer to erase; each `{"op": "upsert", "path", "value"}`
    replaces (or adds) a value. Records what was done in `erased` / `masked`, as OPA does."""
    erased: list[str] = []
    masked: list[str] = []
    for item in sorted(mask, key=json.dumps) if isinstance(mask, list) else []:
        if isinstance(item, str):
            if _pointer_remove(event, item):
                erased.append(item)
        elif isinstance(item, dict) and item.get("op") == "upsert" and isinstance(item.get("path"), str):
            if _pointer_upsert(event, item["path"], item.get("value")):
                masked.append(item["path"])
        elif (
            isinstance(item, dict)
            and item.get("op") == "remove"
            and isinstance(item.get("path"), str)
            and _pointer_remove(event, item["path"])
        ):
            erased.append(item["path"])
    if erased:
        event["erased"] = erased
    if masked:
        event["masked"] = masked
    return event


def _parts(pointer: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]] if pointer.startswith("/") else []


def _pointer_remove(doc: Any, pointer: str) -> bool:
    parts = _parts(pointer)
    if not parts or parts[0] not in ("input", "result"):
        return False
    node = doc
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    if isinstance(node, dict) and parts[-1] in node:
        del node[parts[-1]]
        return True
    return False


def _pointer_upsert(doc: Any, pointer: str, value: Any) -> bool:
    parts = _parts(pointer)
    if not parts or parts[0] not in ("input", "result"):
        return False
    node = doc
    for part in parts[:-1]:
        if not isinstance(node, dict):
            return False
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        return False
    node[parts[-1]] = value
    return True


class DecisionLog:
    """Writes one JSON line per decision to `path`. The mask engine is compiled from the bundle in use
    (`use`), only when the bundle has mask rules, and is only ever touched by the event loop's thread.
    A decision that carries its mask (`Decision.log_mask`: the embedded engine evaluated it with the
    decision, from the same mask rules, for this very document and result) is not evaluated again.

    Lines are written through a buffer: it reaches the file when it fills (64 KB), at most
    `flush_seconds` after the first line in it (a background thread flushes it), and at `close`.
    A crash of the process loses at most the lines of that last interval; the audit record of every
    call is written on its own, durably (server/audit). `flush_seconds` = 0 writes every line at once.

    `emit_later` (the policy stage's) takes the line off the call's path: the time is taken at once, the
    event built and written later, in order with every other line: once the request is answered
    (`after_response`: the lean edge says when, and waits at most as long), else by `write_pending`,
    which the audit stage calls once the call is answered, and at most `LATER_SECONDS` after the
    decision (a refused call, a resource read); `close`, and a `flush` on the loop's thread, write what still waits. Not
    while the call waits for its decision's commit: that work would hold the GIL the SQLite writer
    thread needs to start the commit, and delay it as much (measured: +40 µs on the record stage).

    After masking, `redactor` removes any secret the mask rules missed (in the input and the reasons).
    When `max_bytes` > 0, a line that would take the file past it first rotates the file: `path` becomes
    `path.1`, `path.1` becomes `path.2`..., and only `keep` rotated files are kept. A failed write (a full
    disk) is logged and counted in `failures`; it never reaches the caller.
    """

    def __init__(
        self,
        path: Path,
        bundle: PolicyBundle,
        decision_path: str,
        redactor: Redactor | None = None,
        max_bytes: int = 0,
        keep: int = 5,
        flush_seconds: float = 1.0,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._flush_seconds = flush_seconds
        self._max_bytes = max_bytes
        self._keep = keep
        self._redactor = redactor or Redactor()
        self._file: IO[bytes] | None = None
        self._size = 0
        self.failures = 0
        self._open()
        self._decision_path = decision_path
        self._instance = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._owner = new_owner()  # the mask engine lives with the thread that uses it (_thread_engines)
        self._mask_bundle: PolicyBundle | None = None
        self.use(bundle)
        # Decisions whose line is still to be built (`emit_later`), in order: (document, decision, time,
        # mask bundle), and the thread that queued them (the only one that builds them).
        self._pending: deque[tuple[dict[str, Any], Decision, float, PolicyBundle | None]] = deque()
        self._pending_thread: int | None = None
        self._due: asyncio.TimerHandle | None = None  # the latest the waiting lines are written
        self._due_loop: asyncio.AbstractEventLoop | None = None
        self._dirty = threading.Event()  # lines are in the buffer
        self._closing = threading.Event()
        if flush_seconds > 0:
            threading.Thread(
                target=_flush_every,
                args=(weakref.ref(self), self._dirty, self._closing, flush_seconds),
                name="decision-log-flush",
                daemon=True,
            ).start()
            weakref.finalize(self, _wake, self._dirty, self._closing)

    def use(self, bundle: PolicyBundle) -> None:
        """Compile only the `system.log` modules (with the data): a small engine, evaluated per decision."""
        self._mask_bundle = log_mask_bundle(bundle)

    def event(self, document: dict[str, Any], decision: Decision) -> dict[str, Any]:
        """The event for one decision. Masking edits `document` in place: pass one that is not used
        again (the policy stage builds a fresh input for every call)."""
        return self._event(document, decision, time.time(), self._mask_bundle)

    def _event(
        self, document: dict[str, Any], decision: Decision, at: float, mask_bundle: PolicyBundle | None
    ) -> dict[str, Any]:
        """The event of a decision taken at `at` (a `time.time()`), masked by the rules of `mask_bundle`
        (the ones in use when it was taken)."""
        result = {"allow": decision.allow, "reasons": list(decision.reasons), "obligations": dict(decision.obligations)}
        event: dict[str, Any] = {
            "decision_id": decision.decision_id or uuid.uuid4().hex,
            "labels": {"id": self._instance, "version": f"castellan-{__version__}", "engine": decision.engine},
            "bundles": {"castellan": {"revision": decision.policy_version}},
            "path": self._decision_path,
            "input": document,
            "result": result,
            "requested_by": "castellan",
            "timestamp": datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z"),
            "metrics": {"timer_castellan_decide_ns": int(decision.eval_ms * 1e6)},
        }
        if mask_bundle is not None:
            given = decision.log_mask
            if (
                given is not None
                and given.mask_version == mask_bundle.version
                and given.document is document
                and given.result == result
            ):
                value = given.value
            else:
                mask = engine_for(self._owner, mask_bundle.version, lambda: compile_bundle(mask_bundle))
                mask.set_input_json(encode_bytes({"input": event["input"], "result": result}).decode())
                raw = mask.eval_rule_as_json(MASK_RULE)
                value = None if raw == _UNDEFINED else decode(raw)
            if value is not None:
                apply_mask(event, value)
        redactor = self._redactor
        if "erased" not in event and "masked" not in event and isinstance(document, dict):
            # The audit record of this decision keeps the same document, less what it recomputes: redacted
            # once, for both, by whichever writes it first (server/audit/records.py `decision_record`,
            # with this redactor), the other taking it with `kept`.
            recorded = recorded_input(document)
            kept = redactor.kept(decision, recorded)
            redacted = _joined(document, kept, redactor) if type(kept) is dict else None
            if redacted is None:
                redacted = redactor.apply(document)
                if type(redacted) is dict:
                    redactor.keep(decision, recorded, recorded_input(redacted))
            event["input"] = redacted
        else:
            event["input"] = redactor.apply(event["input"])
        event["result"] = redactor.apply(event["result"])
        return event

    def emit(self, document: dict[str, Any], decision: Decision) -> None:
        """Write the line of `decision` now (after those this thread queued: the lines stay in order)."""
        if self._pending and self._pending_thread == threading.get_ident():
            self._write_pending()
        self._emit(document, decision, time.time(), self._mask_bundle)

    def emit_later(self, document: dict[str, Any], decision: Decision) -> None:
        """Write the line of `decision` later, off the caller's path (`write_pending`, at most
        `LATER_SECONDS` from now): the line `emit` writes now, its time the decision's. Without a
        running loop, written now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.emit(document, decision)
            return
        pending = self._pending
        if pending and self._pending_thread != threading.get_ident():  # another loop's thread builds those
            self._emit(document, decision, time.time(), self._mask_bundle)
            return
        first = not pending
        if first:
            self._pending_thread = threading.get_ident()
        pending.append((document, decision, time.time(), self._mask_bundle))
        if first and after_response.queue(self.write_pending):  # written once the request is answered
            return
        due = self._due
        if due is None or due.cancelled() or self._due_loop is not loop:  # one timer for the lines joining it
            self._due, self._due_loop = loop.call_later(LATER_SECONDS, self._write_due), loop

    def _write_due(self) -> None:
        self._due = None
        self._write_pending()

    def write_pending(self) -> None:
        """Write the lines waiting, if this thread queued them (the audit stage calls it once a call is
        answered: the loop's idle time at low concurrency)."""
        if self._pending and self._pending_thread == threading.get_ident():
            self._write_pending()
            due = self._due
            if due is not None and self._due_loop is _running_loop():  # nothing is left for it: cancelled,
                due.cancel()  # it wakes no idle loop (a cancelled timer is dropped, never waited for)
                self._due = None

    def _write_pending(self) -> None:
        """Write the lines waiting (in order); each failure is counted and logged, never raised."""
        pending = self._pending
        while pending:
            document, decision, at, mask_bundle = pending[0]
            self._emit(document, decision, at, mask_bundle)
            pending.popleft()  # after: a line emitted meanwhile (from a log call) queues behind it

    def _emit(self, document: dict[str, Any], decision: Decision, at: float, mask_bundle: PolicyBundle | None) -> None:
        try:
            line = encode_bytes(self._event(document, decision, at, mask_bundle)) + b"\n"  # standard JSON, UTF-8
            with self._lock:
                self._write(line)
            if not self._dirty.is_set():
                self._dirty.set()
        except Exception as exc:  # the decision stands; a log line is not worth failing a call over
            self.failures += 1
            log.error("decision_log_failed", error=repr(exc))

    def flush(self) -> None:
        """Write what the buffer holds to the file (on the thread that queued lines, those too; the
        flushing thread leaves them to it). A failure is logged and counted, never raised."""
        if self._pending and self._pending_thread == threading.get_ident():
            self._write_pending()
        with self._lock:
            self._dirty.clear()
            try:
                if self._file is not None and not self._file.closed:
                    self._file.flush()
            except Exception as exc:
                self.failures += 1
                log.error("decision_log_failed", error=repr(exc))

    def _write(self, line: bytes) -> None:
        if self._file is None:  # the last rotation could not reopen the file
            self._open()
        if self._max_bytes and self._size and self._size + len(line) > self._max_bytes:
            self._rotate()
            self._open()
        assert self._file is not None
        self._file.write(line)
        self._size += len(line)  # bytes: UTF-8, a non-ASCII character is more than one
        if self._flush_seconds <= 0:  # a write per line (binary files have no line buffering)
            self._file.flush()

    def _open(self) -> None:
        self._file = open(self._path, "ab", buffering=_BUFFER)  # noqa: SIM115 - lives with the app
        self._size = self._file.tell()

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        rotated = [self._path.with_name(f"{self._path.name}.{n}") for n in range(1, self._keep + 1)]
        for older, newer in zip(reversed(rotated[1:]), reversed(rotated[:-1]), strict=True):
            if newer.exists():
                os.replace(newer, older)
        if rotated:
            os.replace(self._path, rotated[0])
        else:
            self._path.unlink()

    def close(self) -> None:
        """Write the lines still waiting, flush the buffer, close the file and stop the flushing thread."""
        if self._pending:  # the loop's, at shutdown (another thread closing it builds them: none is lost)
            self._write_pending()
        self._closing.set()
        self._dirty.set()
        with self._lock:
            if self._file is not None:  # closed, not dropped: a line emitted after close fails and is counted
                try:
                    self._file.close()
                except Exception as exc:
                    self.failures += 1
                    log.error("decision_log_failed", error=repr(exc))
        drop(self._owner)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _joined(document: dict[str, Any], kept: dict[str, Any], redactor: Redactor) -> dict[str, Any] | None:
    """`redactor.apply(document)`, from `kept` (the redaction of its `recorded_input`) and a redaction of
    what that leaves out, member by member in the document's order; None when a member's name does not
    come back as it is (a name redacted: the whole document is redacted again then)."""
    rest = redactor.apply({k: v for k, v in document.items() if k in RECOMPUTED})
    joined: dict[str, Any] = {}
    try:
        for key in document:
            joined[key] = rest[key] if key in RECOMPUTED else kept[key]
    except KeyError:
        return None
    if len(joined) != len(kept) + len(rest):
        return None
    return joined


def _flush_every(
    ref: weakref.ref[DecisionLog], dirty: threading.Event, closing: threading.Event, seconds: float
) -> None:
    """The flushing thread: `seconds` after a line enters the buffer, flush it. It holds the log only
    while flushing, so a log nobody closed is still collected (its file flushes as it is freed)."""
    while not closing.is_set():
        dirty.wait()
        if closing.wait(seconds):
            return
        decision_log = ref()
        if decision_log is None:
            return
        decision_log.flush()
        del decision_log


def _wake(dirty: threading.Event, closing: threading.Event) -> None:
    closing.set()
    dirty.set()
