"""Logging never fails its caller: a sink that cannot be written drops the line and counts it."""

from __future__ import annotations

import errno
import io
import logging
from collections.abc import Iterator

import pytest
import structlog

from server import logs


class FullDisk(io.TextIOBase):
    """A log file on a full disk: every write fails with ENOSPC."""

    def write(self, _: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:], root.level = handlers, level


@pytest.mark.usefixtures("restore_logging")
def test_a_full_disk_drops_and_counts_lines_and_never_raises() -> None:
    logs.configure_logging("json", "info", stream=FullDisk())
    before = logs.dropped_lines()
    log = structlog.get_logger("castellan.test")
    log.info("tool_call", decision="deny", reasons=["x"])
    log.error("audit_write_failed", error="disk full")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("stage_failed")
    logging.getLogger("uvicorn.error").error("stdlib %s", "too")
    assert logs.dropped_lines() - before == 4


@pytest.mark.usefixtures("restore_logging")
def test_an_event_that_cannot_be_rendered_is_dropped_not_raised() -> None:
    stream = io.StringIO()
    logs.configure_logging("json", "info", stream=stream)
    before = logs.dropped_lines()

    class Unprintable:
        def __repr__(self) -> str:
            raise ValueError("no")

        __str__ = __repr__

    structlog.get_logger("castellan.test").info("odd", value=Unprintable())
    structlog.get_logger("castellan.test").info("fine")
    assert logs.dropped_lines() - before == 1
    assert '"event": "fine"' in stream.getvalue()
