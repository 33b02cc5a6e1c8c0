"""Prometheus metrics: calls by tool, decision and stage; latency per stage and per call."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# Buckets from 50 µs to 10 s: stages are sub-millisecond, tools can be slow.
_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class LoopHistogram(Histogram):
    """A `prometheus_client.Histogram` (same name, labels, buckets and exposition: `_bucket`, `_count`,
    `_sum`, `_created` per label set) whose `observe` finds its bucket by bisection and takes one lock.

    prometheus_client's observe walks the bounds and takes two locks (the sum's, the bucket's): ~2 µs,
    and a governed call observes 16 times (each stage, then the call). This one keeps plain counts
    per bucket and cumulates them when scraped (so `_count` is always the `+Inf` bucket). Counts live
    in this process only (no multiprocess mode, which the gateway does not use).
    """

    def _metric_init(self) -> None:
        self._created = time.time()
        self._counts = [0] * len(self._upper_bounds)
        self._total = 0.0
        self._observing = threading.Lock()

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        """Count `amount` in the first bucket whose bound is >= it (NaN: the sum only, as
        prometheus_client). Exemplars are not kept (the gateway gives none)."""
        try:
            counts, observing = self._counts, self._observing
        except AttributeError:  # the labelled parent (no counts), refused as prometheus_client refuses it
            raise ValueError("histogram metric is missing label values") from None
        index = bisect_left(self._upper_bounds, amount) if amount == amount else len(counts)
        with observing:
            self._total += amount
            if index < len(counts):
                counts[index] += 1

    def _child_samples(self) -> Iterable[Sample]:
        with self._observing:
            counts, total = list(self._counts), self._total
        samples = []
        cumulated = 0.0
        for bound, count in zip(self._upper_bounds, counts, strict=True):
            cumulated += count
            le = floatToGoString(bound)  # type: ignore[no-untyped-call]
            samples.append(Sample("_bucket", {"le": le}, cumulated, None, None))
        samples.append(Sample("_count", {}, cumulated, None, None))
        if self._upper_bounds[0] >= 0:
            samples.append(Sample("_sum", {}, total, None, None))
        if _prometheus_metrics._use_created:
            samples.append(Sample("_created", {}, self._created, None, None))
        return tuple(samples)


class Metrics:
    """One registry per app, so tests and several apps in one process do not share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # memory, CPU, fds, GC
            self.registry.register(collector)
        self.calls = Counter(
            "castellan_tool_calls",
            "Tool calls by tool, decision (allow/deny/error) and the stage that decided.",
            ["tool", "decision", "stage"],
            registry=self.registry,
        )
        self.stage_seconds = LoopHistogram(
            "castellan_stage_seconds",
            "Time spent in each pipeline stage.",
            ["stage"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.call_seconds = LoopHistogram(
            "castellan_call_seconds",
            "Time for a whole tool call through the pipeline.",
            ["tool"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "castellan_auth_failures",
            "Requests rejected before MCP, by reason.",
            ["reason"],
            registry=self.registry,
        )

        self.shipped = Counter(
            "castellan_audit_shipped_calls", "Calls shipped to MLflow as traces.", registry=self.registry
        )
        self.ship_failures = Counter(
            "castellan_audit_ship_failures", "Failed attempts to ship a batch to MLflow.", registry=self.registry
        )
        self.ship_seconds = Histogram(
            "castellan_audit_ship_batch_seconds",
            "Time to write one batch of traces to MLflow.",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.ship_backlog = Gauge(
            "castellan_audit_unshipped_records", "Audit records not yet shipped to MLflow.", registry=self.registry
        )
        self.ship_lag = Gauge(
            "castellan_audit_ship_lag_seconds",
            "Age of the oldest audit record not yet shipped to MLflow.",
            registry=self.registry,
        )
        self.shipper_errors = Counter(
            "castellan_audit_shipper_errors",
            "Errors the shipper survived outside shipping itself (status file, retention, ...), by where.",
            ["where"],
            registry=self.registry,
        )
        self.checkpoints_shipped = Counter(
            "castellan_audit_checkpoints_shipped", "Signed chain checkpoints shipped to MLflow.", registry=self.registry
        )
        self.unfinished_calls = Gauge(
            "castellan_audit_unfinished_calls",
            "Allowed calls with no outcome for longer than audit.ship_incomplete_after_seconds.",
            registry=self.registry,
        )
        self.interrupted_calls = Counter(
            "castellan_audit_interrupted_calls",
            "Calls of a previous gateway instance closed as interrupted at start-up.",
            registry=self.registry,
        )
        self.audit_records_retired = Counter(
            "castellan_audit_records_retired", "Shipped outbox records removed by retention.", registry=self.registry
        )
        self.mlflow_traces_retired = Counter(
            "castellan_audit_mlflow_traces_retired",
            "Traces removed from the local MLflow store by retention.",
            registry=self.registry,
        )
        self.data_free_bytes = Gauge(
            "castellan_data_dir_free_bytes", "Free space on the data directory's file system.", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
