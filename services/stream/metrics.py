"""Prometheus metrics of the stream consumer (served on :9465 by default)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_BATCH_SIZES = (1, 10, 50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FRESHNESS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class StreamMetrics:
    """The consumer's metrics, in their own registry (several consumers may share a test process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "recstack_stream_events_consumed", "Kafka records read, valid or not", registry=r
        )
        self.applied = Counter(
            "recstack_stream_events_applied", "Events applied to the features (exactly once each)", registry=r
        )
        self.duplicate = Counter(
            "recstack_stream_events_duplicate", "Events skipped because their event_id was already applied", registry=r
        )
        self.dead_lettered = Counter(
            "recstack_stream_events_dead_lettered", "Malformed records sent to the dead-letter topic", registry=r
        )
        self.replayed = Counter(
            "recstack_stream_events_replayed",
            "Records read again after a restart or rebalance and skipped by the offset fence",
            registry=r,
        )
        self.logged = Counter("recstack_stream_events_logged", "Events appended to the event log", registry=r)
        self.redis_retries = Counter(
            "recstack_stream_redis_retries", "Batch writes retried after a Redis or Kafka error", registry=r
        )
        self.fence_conflicts = Counter(
            "recstack_stream_fence_conflicts",
            "Batch writes refused because another writer had moved a partition's applied offset",
            registry=r,
        )
        self.stale_users = Counter(
            "recstack_stream_stale_users",
            "Users written by another writer between a batch's read and its write (the batch was redone)",
            registry=r,
        )
        self.batch_size = Histogram(
            "recstack_stream_batch_size", "Records per applied batch", buckets=_BATCH_SIZES, registry=r
        )
        self.batch_seconds = Histogram(
            "recstack_stream_batch_seconds",
            "Time to process one batch: decode, dead-letter, aggregate, Redis write",
            buckets=_SECONDS,
            registry=r,
        )
        self.freshness = Histogram(
            "recstack_stream_freshness_seconds",
            "From the Kafka record timestamp (publish time) to the event being visible in Redis",
            buckets=_FRESHNESS,
            registry=r,
        )
        self.lag = Gauge(
            "recstack_stream_consumer_lag", "Records not yet applied, per partition", ["partition"], registry=r
        )

    def serve(self, port: int) -> None:
        """Serve ``/metrics`` on ``port`` (all interfaces) from a daemon thread."""
        start_http_server(port, registry=self.registry)
