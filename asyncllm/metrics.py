"""Prometheus metrics of one engine (prometheus-client, with a registry of its own)."""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Gauges(Collector):
    """Gauges read from the engine when scraped, so the engine loop never updates them."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        values = self._read()
        for name, doc in (
            ("num_requests_running", "Requests in the running batch."),
            ("num_requests_waiting", "Requests waiting for admission."),
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1)."),
            ("kv_cache_free_blocks", "Free KV cache blocks."),
            ("prefix_cache_blocks", "KV blocks held by the prefix cache (in use or evictable)."),
            ("event_loop_lag_seconds", "Delay of the last event-loop lag probe."),
        ):
            yield GaugeMetricFamily(f"asyncllm:{name}", doc, value=values.get(name, 0.0))


class LatencyHistogram(Collector):
    """A Prometheus histogram observed once per token on the event-loop thread: a bucket index and two adds, no
    lock (prometheus_client's Histogram takes a lock per observation). Read on the same thread when scraped."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self.name, self.doc, self.bounds = name, doc, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        registry.register(self)

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # bucket i counts bounds[i-1] < v <= bounds[i]
        self.sum += seconds

    def collect(self) -> Iterator[Any]:
        cumulative, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            total += count
            cumulative.append((bound, total))
        yield HistogramMetricFamily(self.name, self.doc, buckets=cumulative, sum_value=self.sum)


class EngineMetrics:
    def __init__(self, read_gauges: Callable[[], dict[str, float]]) -> None:
        r = self.registry = CollectorRegistry()
        self.prompt_tokens = Counter("asyncllm:prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("asyncllm:generation_tokens", "Tokens generated.", registry=r)
        self.preemptions = Counter("asyncllm:num_preemptions", "Requests preempted (recomputed later).", registry=r)
        self.requests = Counter("asyncllm:request_success", "Finished requests by reason.", ["finished_reason"], registry=r)
        self.cache_queries = Counter("asyncllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r)
        self.cache_hits = Counter("asyncllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r)
        self.disconnects = Counter("asyncllm:client_disconnects", "Requests aborted by their client.", registry=r)
        self.ttft = LatencyHistogram("asyncllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS, r)
        self.itl = LatencyHistogram("asyncllm:inter_token_latency_seconds", "Time between tokens.", _LATENCY_BUCKETS, r)
        self.e2e = LatencyHistogram("asyncllm:e2e_request_latency_seconds", "Request latency.", _LATENCY_BUCKETS, r)
        r.register(_Gauges(read_gauges))
