from __future__ import annotations

import math
import re

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from server.metrics import _BUCKETS, LoopHistogram, Metrics

# Every kind of value a bound can meet: on a bound, just under and over one, past the last, zero,
# negative, infinite and NaN (which prometheus_client adds to the sum only).
AMOUNTS = [0.0, 5e-5, 4.99e-5, 5.01e-5, 1e-4, 2.5e-4, 9.99e-4, 0.3, 10, 10.5, 1e9, math.inf, -1.0, math.nan]


def _rendered(kind: type[Histogram], amounts: list[float]) -> str:
    registry = CollectorRegistry()
    histogram = kind("castellan_stage_seconds", "Time spent in each pipeline stage.", ["stage"],
                     buckets=_BUCKETS, registry=registry)  # fmt: skip
    histogram.labels("never")  # a series with no observation yet
    for i, amount in enumerate(amounts):
        histogram.labels("a" if i % 2 else "b").observe(amount)
    histogram.labels(stage="c").observe(0.002)
    return re.sub(r"_created\{(.*)\} .*", r"_created{\1} (time)", generate_latest(registry).decode())


def test_a_loop_histogram_renders_exactly_as_prometheus_clients_histogram() -> None:
    assert _rendered(LoopHistogram, AMOUNTS) == _rendered(Histogram, AMOUNTS)


def test_a_loop_histograms_count_is_its_last_bucket_and_sum_its_observations() -> None:
    metrics = Metrics()
    for amount in (0.001, 0.002, 20.0):
        metrics.stage_seconds.labels("policy").observe(amount)
    sample = metrics.registry.get_sample_value
    assert sample("castellan_stage_seconds_count", {"stage": "policy"}) == 3
    assert sample("castellan_stage_seconds_bucket", {"stage": "policy", "le": "+Inf"}) == 3
    assert sample("castellan_stage_seconds_bucket", {"stage": "policy", "le": "0.001"}) == 1
    assert sample("castellan_stage_seconds_sum", {"stage": "policy"}) == pytest.approx(20.003)


def test_a_loop_histogram_without_its_labels_refuses_to_observe_as_prometheus_client_does() -> None:
    with pytest.raises(ValueError, match="missing label values"):
        Metrics().call_seconds.observe(1.0)
