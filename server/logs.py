"""Structured logging: structlog, JSON in production, pretty on a terminal, stdlib logs routed through it.

Every event passes the audit redactor before it is rendered, and logging never fails its caller: a
line that cannot be rendered or written (a full disk, a closed pipe) is dropped and counted
(`dropped_lines`), so no logging failure can change a decision or a response.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from server.audit.redaction import Redactor

_lock = threading.Lock()
_dropped = 0
_redactor: Redactor | None = None


def use_redactor(redactor: Redactor) -> None:
    """Redact log events with `redactor` (the gateway's, so logs and the audit log agree)."""
    global _redactor
    _redactor = redactor


def dropped_lines() -> int:
    """Log lines lost because they could not be rendered or written, since the process started."""
    return _dropped


def _count_drop() -> None:
    global _dropped
    with _lock:
        _dropped += 1


def redact_event(_logger: Any, _method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """structlog processor: the event with every secret the redactor finds replaced (values and keys)."""
    global _redactor
    if _redactor is None:
        from server.audit.redaction import Redactor
        from server.settings import AuditSettings

        _redactor = Redactor.from_settings(AuditSettings())
    exc_info = event.pop("exc_info", None)  # the stdlib's (type, value, traceback), for the renderer
    redacted: structlog.typing.EventDict = _redactor.apply(event)
    if exc_info is not None:
        redacted["exc_info"] = exc_info
    return redacted


class _Guarded:
    """The processor chain as one processor: if any step raises, the event is dropped and counted."""

    def __init__(self, processors: Sequence[structlog.typing.Processor]) -> None:
        self._processors = tuple(processors)

    def __call__(self, logger: Any, method: str, event: structlog.typing.EventDict) -> Any:
        try:
            value: Any = event
            for processor in self._processors:
                value = processor(logger, method, value)
            return value
        except Exception:
            _count_drop()
            raise structlog.DropEvent from None


class SafeWriter:
    """A structlog logger that writes one line per event to `stream` and never raises."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        try:
            with self._lock:
                self._stream.write(message + "\n")
                self._stream.flush()
        except Exception:
            _count_drop()

    log = debug = info = warn = warning = error = err = critical = fatal = exception = failure = msg


class _SafeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stdlib handler, counting a failed write instead of printing a traceback to stderr."""

    def handleError(self, record: logging.LogRecord) -> None:
        _count_drop()


def configure_logging(fmt: str = "auto", level: str = "info", stream: IO[str] | None = None) -> None:
    """Configure structlog and the stdlib root logger once, for the whole process (to stderr by default)."""
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[_Guarded([*shared, structlog.processors.format_exc_info, redact_event, renderer])],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: SafeWriter(out),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redact_event, renderer],
    )
    handler = _SafeHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The SDK logs every session at INFO and every bad Host at WARNING; keep ours the record of note.
    logging.getLogger("mcp").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("uvicorn.access").setLevel(max(logging.WARNING, root.level))
