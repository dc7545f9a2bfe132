"""Prometheus metrics of one engine (prometheus-client, with a registry of its own)."""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Gauges(Collector):
    """Gauges read from the engine when scraped, so the engine loop never updates them."""

    def __init__(self, read: Callable[[], dict[str, float]], model_name: str) -> None:
        self._read, self._model = read, model_name

    def collect(self) -> Iterator[Any]:
        values = self._read()
        for name, doc in (
            ("num_requests_running", "Requests in the running batch."),
            ("num_requests_waiting", "Requests waiting for admission."),
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1)."),
            ("kv_cache_free_blocks", "Free KV cache blocks."),
            ("prefix_cache_blocks", "KV blocks held by the prefix cache (in use or evictable)."),
            ("event_loop_lag_seconds", "Delay of the last event-loop lag probe."),
            ("decode_step_seconds", "GPU time of a decode step, measured with --max-step-slowdown (moving average; else 0)."),
            ("prompt_token_limit", "Most prompt tokens a step takes while requests decode (0: no limit)."),
        ):
            gauge = GaugeMetricFamily(f"asyncllm:{name}", doc, labels=["model_name"])
            gauge.add_metric([self._model], values.get(name, 0.0))
            yield gauge


class LatencyHistogram(Collector):
    """A Prometheus histogram observed on the event-loop thread, once per request or once per step for all its
    tokens (`observe_gaps`), with no lock (prometheus_client's Histogram takes one per observation). Read on the
    same thread when scraped. Bucket i counts bounds[i-1] < v <= bounds[i]; the last one, v above every bound."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...], registry: CollectorRegistry,
                 model_name: str) -> None:
        self.name, self.doc, self.bounds, self.model = name, doc, buckets, model_name
        self._bounds = np.asarray(buckets)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)
        self.sum = 0.0
        registry.register(self)

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def observe_gaps(self, now: float, since: list[float]) -> None:
        """Observe `now - t` for every t in `since` (a step's inter-token latencies, in one numpy pass)."""
        gaps = now - np.array(since)
        self.counts += np.bincount(self._bounds.searchsorted(gaps), minlength=len(self.counts))
        self.sum += float(gaps.sum())

    def collect(self) -> Iterator[Any]:
        cumulative, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts.tolist()):
            total += count
            cumulative.append((bound, total))
        family = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        family.add_metric([self.model], cumulative, sum_value=self.sum)
        yield family


class EngineMetrics:
    """Every metric carries the label model_name (the served model's name), as dashboards and gateways filter
    on it. Counters are bound to it once (`.labels(...)` is not looked up per token)."""

    def __init__(self, read_gauges: Callable[[], dict[str, float]], model_name: str) -> None:
        r = self.registry = CollectorRegistry()
        self.model_name = model_name

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, ["model_name"], registry=r).labels(model_name)

        self.prompt_tokens = counter("asyncllm:prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("asyncllm:generation_tokens", "Tokens generated.")
        self.preemptions = counter("asyncllm:num_preemptions", "Requests preempted (recomputed later).")
        self._requests = Counter("asyncllm:request_success", "Finished requests by reason.",
                                 ["model_name", "finished_reason"], registry=r)
        self.cache_queries = counter("asyncllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.cache_hits = counter("asyncllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.disconnects = counter("asyncllm:client_disconnects", "Requests aborted by their client.")
        self.ttft = LatencyHistogram("asyncllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS, r,
                                     model_name)
        self.itl = LatencyHistogram("asyncllm:inter_token_latency_seconds", "Time between tokens.", _LATENCY_BUCKETS, r,
                                    model_name)
        self.e2e = LatencyHistogram("asyncllm:e2e_request_latency_seconds", "Request latency.", _LATENCY_BUCKETS, r,
                                    model_name)
        # time to first token = queue (arrival -> first admission) + prefill (admission -> first token delivered)
        self.queue_time = LatencyHistogram("asyncllm:request_queue_time_seconds", "Time from arrival to first "
                                           "admission.", _LATENCY_BUCKETS, r, model_name)
        self.prefill_time = LatencyHistogram("asyncllm:request_prefill_time_seconds", "Time from first admission "
                                             "to the first token.", _LATENCY_BUCKETS, r, model_name)
        r.register(_Gauges(read_gauges, model_name))

    def finished(self, reason: str) -> None:
        self._requests.labels(self.model_name, reason).inc()

    def value(self, name: str, **labels: str) -> float | None:
        """A sample's value (tests, tools): `name` with this engine's model_name and `labels`."""
        return self.registry.get_sample_value(name, {"model_name": self.model_name, **labels})
