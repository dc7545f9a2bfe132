"""Prometheus metrics of one engine (prometheus-client, with a registry of its own)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
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
        self.ttft = Histogram("asyncllm:time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("asyncllm:inter_token_latency_seconds", "Time between tokens.", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("asyncllm:e2e_request_latency_seconds", "Request latency.", buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_Gauges(read_gauges))
