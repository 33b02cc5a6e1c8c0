"""Which agent run a call belongs to: from `_meta`, headers, or the W3C traceparent."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from server.call import RunInfo

RUN_ID_META = ("io.castellan/runId", "run_id")
DEPTH_META = ("io.castellan/depth", "depth")
RUN_ID_HEADER = "x-castellan-run-id"
DEPTH_HEADER = "x-castellan-run-depth"
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def run_info(meta: Mapping[str, Any] | None, headers: Mapping[str, str] | None, fallback: str) -> RunInfo:
    """The run: an explicit run id wins, then the trace id of a valid traceparent, then `fallback`
    (the call is a run of its own). Values that do not look like ids are ignored, not trusted."""
    meta = meta or {}
    headers = headers or {}
    traceparent = _first_str(meta.get("traceparent"), headers.get("traceparent"))
    trace = _TRACEPARENT.match(traceparent or "")
    run_id = _first_str(*(meta.get(k) for k in RUN_ID_META), headers.get(RUN_ID_HEADER))
    if run_id is None or not _RUN_ID.match(run_id):
        run_id = trace.group(1) if trace else fallback
    depth_raw = _first_str(*(str(meta[k]) for k in DEPTH_META if k in meta), headers.get(DEPTH_HEADER))
    depth = int(depth_raw) if depth_raw is not None and depth_raw.isdigit() and len(depth_raw) < 6 else 0
    return RunInfo(run_id=run_id, depth=depth, traceparent=traceparent if trace else None)


def _first_str(*values: Any) -> str | None:
    return next((v for v in values if isinstance(v, str) and v), None)
