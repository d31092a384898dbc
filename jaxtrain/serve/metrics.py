"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own.

- ``jaxtrain_requests_total{endpoint, status}``: HTTP requests answered;
- ``jaxtrain_queue_length``: requests waiting for a decode row;
- ``jaxtrain_batch_occupancy``: the fraction of decode rows holding a request;
- ``jaxtrain_generated_tokens_total`` and ``jaxtrain_prompt_tokens_total``;
- ``jaxtrain_generated_tokens_per_second``: over the last ``WINDOW`` seconds;
- ``jaxtrain_time_to_first_token_seconds`` and ``jaxtrain_inter_token_latency_seconds``:
  histograms, per request and per generated token.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

WINDOW = 10.0  # seconds the tokens/s gauge looks back
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The counters, gauges and histograms, and their text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "jaxtrain_requests", "HTTP requests answered", ["endpoint", "status"],
            registry=registry,
        )  # fmt: skip
        self.queue = Gauge(
            "jaxtrain_queue_length", "requests waiting for a decode row", registry=registry
        )
        self.occupancy = Gauge(
            "jaxtrain_batch_occupancy", "fraction of decode rows holding a request",
            registry=registry,
        )  # fmt: skip
        self.generated = Counter("jaxtrain_generated_tokens", "tokens generated", registry=registry)
        self.prompt = Counter("jaxtrain_prompt_tokens", "prompt tokens read", registry=registry)
        rate = Gauge(
            "jaxtrain_generated_tokens_per_second",
            f"tokens generated per second over the last {WINDOW:g} s", registry=registry,
        )  # fmt: skip
        rate.set_function(self.tokens_per_second)
        self.ttft = Histogram(
            "jaxtrain_time_to_first_token_seconds", "arrival to first generated token",
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.itl = Histogram(
            "jaxtrain_inter_token_latency_seconds", "time between a request's tokens",
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def record_tokens(self, count: int, now: float) -> None:
        """``count`` tokens generated at time ``now`` (``time.monotonic``)."""
        self.generated.inc(count)
        with self._lock:
            self._recent.append((now, count))
            self._trim(now)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / WINDOW

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - WINDOW:
            self._recent.popleft()

    def render(self) -> bytes:
        return generate_latest(self.registry)
