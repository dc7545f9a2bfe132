"""Metrics the engine keeps on its loop thread."""
from __future__ import annotations

import pytest


def test_latency_histogram_buckets_as_prometheus_reads_them():
    from prometheus_client import CollectorRegistry

    from asyncllm.metrics import LatencyHistogram

    r = CollectorRegistry()
    h = LatencyHistogram("x_seconds", "doc", (0.1, 1.0), r, "m")
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    def get(name: str, **labels: str) -> float | None:
        return r.get_sample_value(name, {"model_name": "m", **labels})

    assert [get("x_seconds_bucket", le=le) for le in ("0.1", "1.0", "+Inf")] == [2, 4, 5]  # le: v <= bound
    assert get("x_seconds_count") == 5 and get("x_seconds_sum") == pytest.approx(4.65)


def test_observe_gaps_counts_as_observing_each_gap():
    import random

    from prometheus_client import CollectorRegistry

    from asyncllm.metrics import LatencyHistogram

    rng = random.Random(0)
    bounds = (0.001, 0.01, 0.1, 1.0)
    one, batch = (LatencyHistogram(f"h{i}_seconds", "doc", bounds, CollectorRegistry(), "m") for i in range(2))
    for _ in range(50):
        now = 100.0
        since = [now - rng.choice([*bounds, rng.uniform(0, 2)]) for _ in range(rng.randint(1, 20))]
        for t in since:
            one.observe(now - t)
        batch.observe_gaps(now, since)
    assert batch.counts.tolist() == one.counts.tolist() and batch.sum == pytest.approx(one.sum)
