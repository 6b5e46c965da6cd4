"""Prometheus metrics for the server, in a registry of their own (several servers in one
process, as in tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "loraplex_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
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
        self.queue = Gauge("loraplex_queue_depth", "Requests waiting for a row", registry=r)
        self.running = Gauge("loraplex_running_rows", "Rows decoding now", registry=r)
        self.batch = Histogram(
            "loraplex_batch_size",
            "Rows per decode step",
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

    def on_step(self, batch: int, waiting: int) -> None:
        """The engine's report after each step (called from its thread)."""
        if batch:
            self.batch.observe(batch)
        self.running.set(batch)
        self.queue.set(waiting)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
