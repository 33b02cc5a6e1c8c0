"""Decision logs in OPA's event format, masked by the bundle's `data.system.log.mask` rules,
whichever engine decided (the mask is evaluated in-process for both: by the embedded engine with the
decision, else here), then redacted like every other sink; written through a buffer flushed within a
second, and rotated by size."""

from __future__ import annotations

import json
import os
import threading
import uuid
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog

from server import __version__
from server.audit.encoding import decode, encode_bytes
from server.audit.redaction import Redactor
from server.policy._input import recorded_input
from server.policy._thread_engines import drop, engine_for, new_owner
from server.policy.bundle import MASK_RULE, PolicyBundle, log_mask_bundle
from server.policy.embedded import compile_bundle
from server.policy.engine import Decision

log = structlog.get_logger("castellan.policy")
__all__ = ["MASK_RULE", "DecisionLog", "apply_mask"]
_UNDEFINED = '"<undefined>"'
_BUFFER = 64 * 1024


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
        result = {"allow": decision.allow, "reasons": list(decision.reasons), "obligations": dict(decision.obligations)}
        event: dict[str, Any] = {
            "decision_id": decision.decision_id or uuid.uuid4().hex,
            "labels": {"id": self._instance, "version": f"castellan-{__version__}", "engine": decision.engine},
            "bundles": {"castellan": {"revision": decision.policy_version}},
            "path": self._decision_path,
            "input": document,
            "result": result,
            "requested_by": "castellan",
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "metrics": {"timer_castellan_decide_ns": int(decision.eval_ms * 1e6)},
        }
        mask_bundle = self._mask_bundle
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
        event["input"] = redactor.apply(event["input"])
        event["result"] = redactor.apply(event["result"])
        if "erased" not in event and "masked" not in event and isinstance(event["input"], dict):
            # The audit record of this decision keeps the same document, less what it recomputes:
            # redacted once, here, for both (server/audit/records.py takes it when its redactor is this one).
            redactor.keep(decision, recorded_input(document), recorded_input(event["input"]))
        return event

    def emit(self, document: dict[str, Any], decision: Decision) -> None:
        try:
            line = encode_bytes(self.event(document, decision)) + b"\n"  # standard JSON, UTF-8
            with self._lock:
                self._write(line)
            if not self._dirty.is_set():
                self._dirty.set()
        except Exception as exc:  # the decision stands; a log line is not worth failing a call over
            self.failures += 1
            log.error("decision_log_failed", error=repr(exc))

    def flush(self) -> None:
        """Write what the buffer holds to the file. A failure is logged and counted, never raised."""
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
        """Flush the buffer, close the file and stop the flushing thread."""
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
