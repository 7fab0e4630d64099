"""Prometheus metrics, in a registry of the server's own (not the process-global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine_stats=None):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gemma_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gemma_generation_seconds",
            "Time to finish a generation",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "gemma_time_to_first_token_seconds",
            "Time to first streamed token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "gemma_prompt_tokens", "Prompt tokens processed", registry=self.registry
        )
        self.generated_tokens = Counter(
            "gemma_generation_tokens", "Tokens generated", registry=self.registry
        )
        self.rejected = Counter(
            "gemma_rejected_overload",
            "Requests refused with 503 at the limit",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "gemma_requests_in_flight", "Generations in progress", registry=self.registry
        )
        if engine_stats is not None:
            self.registry.register(_EngineCollector(engine_stats))

    def observe_generation(
        self, prompt_tokens: int, completion_tokens: int, seconds: float, ttft: float | None = None
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(completion_tokens)
        self.latency.observe(seconds)
        if ttft is not None:
            self.ttft.observe(ttft)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the engine's gauges at scrape time, so they are never stale."""

    def __init__(self, engine_stats):
        self.engine_stats = engine_stats

    def collect(self):
        stats = self.engine_stats()
        yield GaugeMetricFamily(
            "gemma_engine_unfinished_requests",
            "Requests the engine is running or queueing",
            value=stats.running,
        )
        yield GaugeMetricFamily(
            "gemma_engine_waiting_requests", "Requests waiting in the engine", value=stats.waiting
        )
        for name, value in sorted(stats.extra.items()):
            yield GaugeMetricFamily(f"gemma_engine_{name}", f"engine gauge {name}", value=value)
