"""Which agent run a call belongs to: from `_meta`, headers, or the W3C traceparent.

Everything here is declared by the caller, so it is read strictly and never trusted to be well
formed: a value of the wrong JSON type, with non-ASCII digits (Arabic-Indic, full-width, superscript), out of range,
overlong, or with control characters is ignored (as if it had not been sent) and named in
`RunInfo.ignored`, which the call's log line carries. Nothing a caller declares can make this raise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from server.call import RunInfo

RUN_ID_META = ("io.castellan/runId", "run_id")
DEPTH_META = ("io.castellan/depth", "depth")
RUN_ID_HEADER = "x-castellan-run-id"
DEPTH_HEADER = "x-castellan-run-depth"
MAX_DEPTH = 10_000
"""A declared depth above this is not a depth (limits are far below it)."""
# ASCII only, matched whole (`fullmatch`: `$` would let a trailing newline through).
_RUN_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}", re.ASCII)
_DEPTH_TEXT = re.compile(r"[0-9]{1,5}", re.ASCII)
# W3C Trace Context §3.2: version-traceid-parentid-flags, lowercase hex; version ff and all-zero ids
# are invalid. Later versions may append fields after the flags (`-...`), which are ignored.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[\x21-\x7e]*)?", re.ASCII)
_MAX_TRACEPARENT = 512


def run_info(meta: Mapping[str, Any] | None, headers: Mapping[str, str] | None, fallback: str) -> RunInfo:
    """The run: an explicit run id wins, then the trace id of a valid traceparent, then `fallback`
    (the call is a run of its own). `_meta` comes before headers; the first well-formed value of
    each is used, and every malformed one is ignored and named in `ignored`."""
    meta = meta if isinstance(meta, Mapping) else {}
    headers = headers if headers is not None else {}
    ignored: list[str] = []
    candidates = _declared(meta, headers, ("traceparent",), "traceparent", ignored)
    traceparent, trace_id = None, None
    for where, value in candidates:
        trace_id = _trace_id(value)
        if trace_id is not None:
            traceparent = value
            break
        ignored.append(f"{where}: not a W3C traceparent")
    run_id = None
    for where, value in _declared(meta, headers, RUN_ID_META, RUN_ID_HEADER, ignored):
        if isinstance(value, str) and _RUN_ID.fullmatch(value):
            run_id = value
            break
        ignored.append(f"{where}: not a run id (1-128 of A-Z a-z 0-9 _ . : -)")
    depth = None
    for where, value in _declared(meta, headers, DEPTH_META, DEPTH_HEADER, ignored):
        depth = _depth(value)
        if depth is not None:
            break
        ignored.append(f"{where}: not a depth (an integer from 0 to {MAX_DEPTH})")
    return RunInfo(
        run_id=run_id or trace_id or fallback,
        depth=depth or 0,
        traceparent=traceparent,
        ignored=tuple(ignored),
    )


def _declared(
    meta: Mapping[str, Any], headers: Mapping[str, str], meta_keys: tuple[str, ...], header: str, ignored: list[str]
) -> list[tuple[str, Any]]:
    """Each value the caller sent for one field, where it came from first (None and "" are not sent)."""
    found: list[tuple[str, Any]] = [(f"_meta {k}", meta[k]) for k in meta_keys if meta.get(k) not in (None, "")]
    getlist = getattr(headers, "getlist", None)
    values = list(getlist(header)) if callable(getlist) else [headers.get(header)]
    if len(values) > 1:  # sent twice: readers could take either, so neither is used
        ignored.append(f"header {header}: sent more than once")
    elif values and values[0]:
        found.append((f"header {header}", values[0]))
    return found


def _depth(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():  # JSON does not tell 3.0 from 3
        value = int(value) if abs(value) <= MAX_DEPTH else None
    if isinstance(value, str) and _DEPTH_TEXT.fullmatch(value):
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_DEPTH:  # compared, never printed: 10**5000 is fine
        return value
    return None


def _trace_id(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > _MAX_TRACEPARENT:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, _, rest = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16 or (version == "00" and rest):
        return None
    return trace_id
