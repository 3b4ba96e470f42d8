"""Prometheus metrics, named as vLLM names them with the prefix ``shrink:``.

Latencies are measured in the server, per engine request, from its arrival: time to first token,
inter-token latency (a delta carrying k tokens after a gap t counts k intervals of t/k, since a
multi-step decode delivers several tokens at once), time per output token and end-to-end latency.
Scheduler state (running, waiting, KV usage) is read when /metrics is scraped.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "shrink:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class ServerMetrics:
    def __init__(self, model_name: str, num_running: Callable[[], float], num_waiting: Callable[[], float],
                 kv_cache_usage: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens.", _LATENCY_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds", "Per request: (e2e - ttft) / (output tokens - 1).",
                         _LATENCY_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency.", _E2E_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self._model_name = model_name
        for name, doc, fn in (("num_requests_running", "Sequences the engine is running.", num_running),
                              ("num_requests_waiting", "Requests waiting for the engine.", num_waiting),
                              ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", kv_cache_usage)):
            Gauge(PREFIX + name, doc, labels, registry=r).labels(model_name).set_function(fn)
        # Speculative decoding: the engine does not report acceptance yet; record_spec_decode is the hook.
        self.spec_decode_num_drafts = counter("spec_decode_num_drafts", "Speculative draft rounds.")
        self.spec_decode_num_draft_tokens = counter("spec_decode_num_draft_tokens", "Proposed draft tokens.")
        self.spec_decode_num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Accepted draft tokens.")

    def record_spec_decode(self, num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        """Hook for the speculative decoder's per-step acceptance counts."""
        self.spec_decode_num_drafts.inc(num_drafts)
        self.spec_decode_num_draft_tokens.inc(num_draft_tokens)
        self.spec_decode_num_accepted_tokens.inc(num_accepted_tokens)

    def finished(self, reason: str) -> None:
        self._success.labels(self._model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, num_prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, num_prompt_tokens)


class RequestTimer:
    """One engine request's latencies, fed with each delta it receives."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int) -> None:
        self.metrics = metrics
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival = self.last = time.perf_counter()
        self.first: float | None = None
        self.num_tokens = 0
        self.done = False

    def on_tokens(self, k: int) -> None:
        if k == 0:
            return
        now = time.perf_counter()
        m = self.metrics
        if self.first is None:
            self.first = now
            m.ttft.observe(now - self.arrival)
            m.prompt_tokens.inc(self.num_prompt_tokens)
            for _ in range(k - 1):
                m.itl.observe(0.0)
        else:
            for _ in range(k):
                m.itl.observe((now - self.last) / k)
        m.generation_tokens.inc(k)
        self.num_tokens += k
        self.last = now

    def on_finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        now = time.perf_counter()
        m = self.metrics
        m.e2e.observe(now - self.arrival)
        if self.first is not None and self.num_tokens > 1:
            m.tpot.observe((now - self.first) / (self.num_tokens - 1))
        m.finished(reason)
