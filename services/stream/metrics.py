"""Prometheus metrics of the stream consumer (served on :9465 by default)."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import HistogramMetricFamily

from recstack.metrics import in_process_values

_BATCH_SIZES = (1, 10, 50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FRESHNESS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class StreamMetrics:
    """The consumer's metrics, in their own registry (several consumers may share a test process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        with in_process_values():
            self._create(self.registry)

    def _create(self, r: CollectorRegistry) -> None:
        self.consumed = Counter(
            "recstack_stream_events_consumed", "Kafka records read, valid or not", registry=r
        )
        self.applied = Counter(
            "recstack_stream_events_applied", "Events applied to the features (exactly once each)", registry=r
        )
        self.duplicate = Counter(
            "recstack_stream_events_duplicate",
            "Events skipped because their event_id was already applied",
            registry=r,
        )
        self.dead_lettered = Counter(
            "recstack_stream_events_dead_lettered",
            "Malformed records sent to the dead-letter topic",
            registry=r,
        )
        self.dlq_send_failures = Counter(
            "recstack_stream_dlq_send_failures",
            "Dead-letter sends that failed (topic missing or refusing, too large, timed out), each attempt",
            registry=r,
        )
        self.dlq_truncated = Counter(
            "recstack_stream_dlq_truncated",
            "Dead letters sent truncated because the DLQ topic refused the whole record",
            registry=r,
        )
        self.dlq_held = Gauge(
            "recstack_stream_dlq_held_partitions",
            "Partitions paused at a record whose dead letter cannot be sent (retried; nothing skipped)",
            registry=r,
        )
        self.replayed = Counter(
            "recstack_stream_events_replayed",
            "Records read again after a restart or rebalance and skipped by the offset fence",
            registry=r,
        )
        self.logged = Counter("recstack_stream_events_logged", "Events appended to the event log", registry=r)
        self.log_write_failures = Counter(
            "recstack_stream_eventlog_write_failures",
            "Event-log rolls that failed (disk full, read-only): offsets stay uncommitted until one succeeds",
            registry=r,
        )
        self.log_unwritten = Gauge(
            "recstack_stream_eventlog_unwritten_events",
            "Applied events held in memory because the event log could not be written (0 when healthy)",
            registry=r,
        )
        self.log_refused = Counter(
            "recstack_stream_eventlog_refused_events",
            "Events dropped from a roll because their partition had moved to another consumer (it logs them)",
            registry=r,
        )
        self.paused = Gauge(
            "recstack_stream_paused",
            "1 while consuming is paused because too many events wait for the event log (see the log)",
            registry=r,
        )
        self.redis_retries = Counter(
            "recstack_stream_redis_retries", "Batch writes retried after a Redis or Kafka error", registry=r
        )
        self.fence_conflicts = Counter(
            "recstack_stream_fence_conflicts",
            "Batch writes refused because another writer had moved a partition's applied offset",
            registry=r,
        )
        self.fence_rewinds = Counter(
            "recstack_stream_fence_rewinds",
            "Partitions read again because Redis held an applied offset behind what this consumer had "
            "applied: Redis lost acknowledged writes (restart from an old AOF/RDB file, failover)",
            registry=r,
        )
        self.fence_rewound_records = Counter(
            "recstack_stream_fence_rewound_records",
            "Records read again and applied again after a rewind (from the stored fence + 1 up to what "
            "this consumer had applied; on a Redis Cluster from the lowest slot fence that went back)",
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
        self.freshness = BatchHistogram(
            "recstack_stream_freshness_seconds",
            "From the Kafka record timestamp (publish time) to the event being visible in Redis",
            buckets=_FRESHNESS,
            registry=r,
        )
        self.lag = Gauge(
            "recstack_stream_consumer_lag",
            "Records not yet applied, per partition",
            ["partition"],
            registry=r,
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``addr:port`` (default: loopback only) from a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)


class BatchHistogram:
    """A Prometheus histogram fed a whole batch of observations at once.

    One value per applied event (20,000/s) through ``Histogram.observe`` costs a lock and a call
    each; here a batch is counted into buckets locally and added under one lock.
    """

    def __init__(
        self, name: str, documentation: str, buckets: Iterable[float], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = sorted(buckets) + [math.inf]
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        bounds = self._bounds
        counts = [0] * len(bounds)
        total = 0.0
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1  # bucket "le": value <= bound
            total += value
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
            self._sum += total

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip(self._bounds, counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=total)

    def describe(self) -> Iterator[HistogramMetricFamily]:
        return self.collect()
