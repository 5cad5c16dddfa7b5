"""Prometheus metrics for `GET /metrics` (prometheus_client, one registry per app).

A registry per app (not the library's global one) lets several servers live in one process,
as the tests do, without "duplicated timeseries" errors.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from diffcoder.serve.scheduler import BatchStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Only these paths get their own label value; anything else is "other" (bounded cardinality).
KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


class Metrics:
    def __init__(self, queue_depth: Callable[[], int], running_rows: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "diffcoder_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        Gauge("diffcoder_queue_depth", "requests waiting for a decode batch", registry=r).set_function(queue_depth)
        Gauge("diffcoder_running_rows", "rows in the decode batch now running", registry=r).set_function(running_rows)
        self.batch_size = Histogram(
            "diffcoder_batch_size", "rows per decode batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.tokens = Counter("diffcoder_generated_tokens", "generated tokens committed", registry=r)
        self.forward_passes = Counter("diffcoder_forward_passes", "model forward passes (one per batch step)", registry=r)
        self.row_passes = Counter(
            "diffcoder_row_forward_passes", "forward passes times rows in the batch", registry=r
        )
        self.decode_seconds = Counter("diffcoder_decode_seconds", "seconds spent decoding batches", registry=r)
        self.tokens_per_second = Gauge(
            "diffcoder_tokens_per_second", "generated tokens per second over the last batch", registry=r
        )
        self.passes_per_token = Gauge(
            "diffcoder_forward_passes_per_token",
            "forward passes per generated token of a row over the last batch (lower is faster decoding)",
            registry=r,
        )

    def record_request(self, path: str, status: int) -> None:
        self.requests.labels(endpoint=path if path in KNOWN_PATHS else "other", status=str(status)).inc()

    def record_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.rows)
        self.tokens.inc(stats.tokens)
        self.forward_passes.inc(stats.nfe)
        self.row_passes.inc(stats.nfe * stats.rows)
        self.decode_seconds.inc(stats.seconds)
        if stats.seconds > 0:
            self.tokens_per_second.set(stats.tokens / stats.seconds)
        if stats.tokens > 0:
            self.passes_per_token.set(stats.nfe * stats.rows / stats.tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
