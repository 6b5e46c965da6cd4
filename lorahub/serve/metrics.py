"""Prometheus metrics for the server, in a registry of their own (several servers in one
process, as in tests, do not collide)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
UNMATCHED = "unmatched"  # the endpoint label of every path no route matches


class EngineGauges(Collector):
    """Every numeric entry of the engine's `stats()` ("running", "waiting", "prefilling",
    ...) as a gauge `loraplex_engine_<name>`, read when scraped."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, value in self.stats().items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield GaugeMetricFamily(
                    f"loraplex_engine_{name}", f"The engine's {name!r} now", value
                )


class Metrics:
    def __init__(self, engine: object | None = None) -> None:
        """`engine`: anything with `stats()`, exported as gauges."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "loraplex_requests",
            "HTTP requests answered, by route template (unknown paths: 'unmatched')",
            ["endpoint", "status"],
            registry=r,
        )
        self.tokens = Counter("loraplex_tokens", "Tokens processed", ["kind"], registry=r)
        self.routed = Counter(
            "loraplex_adapter_routed", "Requests that applied each adapter", ["adapter"], registry=r
        )
        self.base_only = Counter(
            "loraplex_routed_to_base",
            "Auto requests the router answered with the base model (no adapter fits)",
            registry=r,
        )
        self.batch = Histogram(
            "loraplex_batch_size",
            "Rows per decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.route_batch = Histogram(
            "loraplex_route_batch_prompts",
            "Prompts per call to the router (concurrent requests are routed together)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.latency = Histogram(
            "loraplex_request_seconds", "Time to the last token", buckets=LATENCY, registry=r
        )
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Time to the first token",
            buckets=LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "loraplex_inter_token_seconds", "Time between tokens", buckets=LATENCY, registry=r
        )

        if engine is not None:
            r.register(EngineGauges(engine.stats))

    def on_step(self, batch: int, waiting: int) -> None:
        """The engine's report after each step (called from its thread)."""
        if batch:
            self.batch.observe(batch)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
