"""Traces as one OTLP/HTTP request per batch, for an `mlflow server` (its `/v1/traces` ingestion).

MLflow's client would build an MLflow `Span` (over an OpenTelemetry `ReadableSpan`) per span and
convert each back to protobuf; the request here is built from the planned traces directly, the same
spans and attributes, and posted with MLflow's own HTTP helper (its credentials, TLS and headers).
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from server.audit.mlflow_sql import span_attributes, span_ids
from server.audit.mlflow_target import TOO_LARGE_STATUSES, BatchTooLarge
from server.audit.traces import TracePlan

OTLP_TRACES_PATH = "/v1/traces"
EXPERIMENT_HEADER = "X-Mlflow-Experiment-Id"


def _set(target: AnyValue, value: Any) -> None:
    """A Python value as an OTLP AnyValue; MLflow decodes it back and stores it JSON-encoded."""
    if value is None:
        return
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, int):
        if -(2**63) <= value < 2**63:
            target.int_value = value
        else:
            target.string_value = str(value)
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, dict):
        kvlist = target.kvlist_value
        kvlist.SetInParent()
        for key, item in value.items():
            kv = kvlist.values.add()
            kv.key = str(key)
            _set(kv.value, item)
    elif isinstance(value, list | tuple):
        array = target.array_value
        array.SetInParent()
        for item in value:
            _set(array.values.add(), item)
    else:
        target.string_value = str(value)


def export_request(plans: Sequence[TracePlan]) -> bytes:
    """One `ExportTraceServiceRequest` holding every span of every planned trace."""
    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    scope.scope.name = "castellan.audit"
    for plan in plans:
        trace_id = plan.otel_trace_id.to_bytes(16, "big")
        ids = span_ids(plan)
        root = ids[0].to_bytes(8, "big")
        for index, sp in enumerate(plan.spans):
            span = scope.spans.add()
            span.trace_id = trace_id
            span.span_id = ids[index].to_bytes(8, "big")
            if index:
                span.parent_span_id = root
            span.name = sp.name
            span.start_time_unix_nano = sp.start_ns
            span.end_time_unix_nano = sp.end_ns
            span.status.code = Status.STATUS_CODE_OK if sp.ok else Status.STATUS_CODE_ERROR
            for key, value in span_attributes(plan, index).items():
                attribute = span.attributes.add()
                attribute.key = key
                _set(attribute.value, value)
    body: bytes = request.SerializeToString()
    return body


def post(host_creds: Any, experiment_id: str, body: bytes, *, compress: bool = False) -> None:
    """Posts one request; returns once the server confirmed it. Raises `BatchTooLarge` when the server
    timed out or refused the request's size (408, 413, 504: a smaller batch may pass), MLflow's
    exception otherwise. `compress`: gzip the body (`Content-Encoding: gzip`, which MLflow decodes)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    headers = {"Content-Type": "application/x-protobuf", EXPERIMENT_HEADER: experiment_id}
    if compress:
        body, headers["Content-Encoding"] = gzip.compress(body, compresslevel=1), "gzip"
    try:
        response = http_request(  # type: ignore[no-untyped-call]
            host_creds=host_creds,
            endpoint=OTLP_TRACES_PATH,
            method="POST",
            data=body,
            extra_headers=headers,
            raise_on_status=False,  # the status is read here: MLflow's mapping loses 408/413/504
        )
    except MlflowException as exc:
        if _timed_out(exc):
            raise BatchTooLarge(f"{OTLP_TRACES_PATH} timed out on {len(body)} bytes") from exc
        raise
    if response.status_code in TOO_LARGE_STATUSES:
        raise BatchTooLarge(f"{OTLP_TRACES_PATH} answered {response.status_code} to {len(body)} bytes")
    verify_rest_response(response, OTLP_TRACES_PATH)


def _timed_out(exc: BaseException) -> bool:
    """Whether a read timed out somewhere down `exc`'s chain. MLflow wraps what requests raises, and
    with its retries off requests reports a read timeout as urllib3's `MaxRetryError` inside a
    `ConnectionError`, not as its own `Timeout`."""
    import requests
    import urllib3.exceptions

    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        found = stack.pop()
        if found is None or id(found) in seen:
            continue
        seen.add(id(found))
        if isinstance(found, requests.exceptions.Timeout | urllib3.exceptions.TimeoutError | TimeoutError):
            return True
        if isinstance(found, urllib3.exceptions.MaxRetryError):
            stack.append(found.reason)
        stack += [found.__cause__, found.__context__, *(a for a in found.args if isinstance(a, BaseException))]
    return False
