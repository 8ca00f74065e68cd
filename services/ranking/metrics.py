"""Prometheus metrics of one ranking server, in their own registry.

A registry per server (not the process-wide default) lets tests run several servers in one
process and read each one's counters; ``recstack serve`` exposes it on ``--metrics-port``.

The metrics are created with in-process values whatever the import order (see
:mod:`recstack.metrics`), and every label combination the service uses is created up front.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from recstack.metrics import in_process_values

# Fine-grained around the 1-20 ms that matter for a 10 ms p99, coarse beyond.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.006,
    0.007,
    0.008,
    0.009,
    0.010,
    0.0125,
    0.015,
    0.0175,
    0.020,
    0.025,
    0.030,
    0.050,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
QUEUE_DELAY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.010,
    0.020,
    0.050,
    0.1,
)
BATCH_REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
BATCH_CANDIDATE_BUCKETS = (100, 200, 400, 800, 1200, 1600, 2400, 3200, 4096, 8192)

METHODS = ("Rank", "Recommend")
CODES = (
    "OK",
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
    "CANCELLED",
    "UNAUTHENTICATED",
)
PATHS = ("light", "full", "cascade")
STAGES = ("fetch", "candidates", "assemble", "forward", "encode")
SHED_REASONS = ("queue_full", "queue_wait", "loop_lag", "deadline", "cancelled", "shutdown")


class RankingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        with in_process_values():
            self._create(self.registry)

    def _create(self, r: CollectorRegistry) -> None:
        self.latency = Histogram(
            "recstack_ranking_request_seconds",
            "Server-side latency of a call, from its arrival to its answer.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_requests = Histogram(
            "recstack_ranking_batch_requests",
            "Requests per micro-batch.",
            buckets=BATCH_REQUEST_BUCKETS,
            registry=r,
        )
        self.batch_candidates = Histogram(
            "recstack_ranking_batch_candidates",
            "Candidates scored per micro-batch.",
            buckets=BATCH_CANDIDATE_BUCKETS,
            registry=r,
        )
        self.queue_delay = Histogram(
            "recstack_ranking_queue_delay_seconds",
            "Time a request waited in the batcher's queue before its batch started.",
            buckets=QUEUE_DELAY_BUCKETS_S,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "recstack_ranking_batch_seconds",
            "Time to compute one micro-batch (feature fetch, assembly, forward), off the event loop.",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_depth = Gauge("recstack_ranking_queue_depth", "Requests waiting for a batch.", registry=r)
        self.loop_lag = Gauge(
            "recstack_ranking_loop_lag_seconds",
            "How late the event loop runs a timer: about how long a new call waits for its handler.",
            registry=r,
        )
        self.in_flight_batches = Gauge(
            "recstack_ranking_batches_in_flight", "Micro-batches being computed.", registry=r
        )
        self.paths = Counter(
            "recstack_ranking_path_total", "Requests served per compute path.", ["path"], registry=r
        )
        self.degraded = Counter(
            "recstack_ranking_degraded_total",
            "Requests answered with fallback features because Redis failed or timed out.",
            registry=r,
        )
        self.redis_failures = Counter(
            "recstack_ranking_redis_failures_total",
            "Feature reads that failed or timed out (each turns to degraded until a probe succeeds).",
            registry=r,
        )
        self.shed = Counter(
            "recstack_ranking_shed_total",
            "Requests refused or dropped before any work.",
            ["reason"],  # SHED_REASONS; cancelled: the caller left (or its deadline ended the call) first
            registry=r,
        )
        self.item_cache = Counter(
            "recstack_ranking_item_cache_total",
            "Candidates found in the in-process item catalogue (hit) or read with their batch (miss).",
            ["result"],
            registry=r,
        )
        self.catalogue_items = Gauge(
            "recstack_ranking_catalogue_items", "Items held in the in-process item catalogue.", registry=r
        )
        self.catalogue_reads = Counter(
            "recstack_ranking_catalogue_reads_total",
            "Item hashes the catalogue's refresher read, by why (changed, resync, preload).",
            ["why"],
            registry=r,
        )
        self.catalogue_refresh_seconds = Histogram(
            "recstack_ranking_catalogue_refresh_seconds",
            "Duration of one refresh of the item catalogue (change feed and re-reads).",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.catalogue_refresh_failures = Counter(
            "recstack_ranking_catalogue_refresh_failures_total",
            "Refreshes of the item catalogue that failed (Redis unreachable); retried next interval.",
            registry=r,
        )
        self.catalogue_age = Gauge(
            "recstack_ranking_catalogue_age_seconds",
            "Seconds since the item catalogue last refreshed from Redis (its staleness bound).",
            registry=r,
        )
        self.model = Info("recstack_ranking_model", "The model version being served.", registry=r)
        self.model_reloads = Counter(
            "recstack_ranking_model_reloads_total",
            "Model versions loaded (success) or refused (failure).",
            ["result"],
            registry=r,
        )
        self.gc_pause = Histogram(
            "recstack_ranking_gc_pause_seconds",
            "Pauses of Python's cyclic garbage collector, per generation (every thread stops).",
            ["generation"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self._create_experiments(r)
        for generation in ("0", "1", "2"):
            self.gc_pause.labels(generation)
        for method in METHODS:
            for code in CODES:
                self.latency.labels(method, code)
        for stage in STAGES:
            self.batch_seconds.labels(stage)
        for path in PATHS:
            self.paths.labels(path)
        for reason in SHED_REASONS:
            self.shed.labels(reason)
        for result in ("success", "failure"):
            self.model_reloads.labels(result)
        for result in ("hit", "miss"):
            self.item_cache.labels(result)
        for why in ("changed", "resync", "preload"):
            self.catalogue_reads.labels(why)

    def _create_experiments(self, r: CollectorRegistry) -> None:
        self.experiment_generation = Gauge(
            "recstack_experiment_generation",
            "Generation of the experiment state this server routes by (0: none seen yet).",
            registry=r,
        )
        self.experiment_fallbacks = Counter(
            "recstack_experiment_version_refusals_total",
            "Experiment arms whose model version was refused (the arm is served by the default version).",
            registry=r,
        )
        self.experiment_state_errors = Counter(
            "recstack_experiment_state_errors_total",
            "Failed polls of the experiment state (Redis unreachable, invalid state); routing unchanged.",
            registry=r,
        )
        self.shadow_batches = Counter(
            "recstack_shadow_batches_total",
            "Shadow batches: scored, or left as dropped (calls waiting), over_budget (CPU share) or failed.",
            ["outcome"],
            registry=r,
        )
        self.impressions_published = Counter(
            "recstack_impressions_published_total",
            "Impressions the broker acknowledged (acks=all).",
            registry=r,
        )
        self.impressions_dropped = Counter(
            "recstack_impressions_dropped_total",
            "Impressions dropped because the bounded buffer was full (no call ever waits on Kafka).",
            registry=r,
        )
        self.impressions_failed = Counter(
            "recstack_impressions_failed_total",
            "Impressions the producer could not deliver (broker error, timeout, shut down unsent).",
            registry=r,
        )
        for outcome in ("scored", "dropped", "over_budget", "failed"):
            self.shadow_batches.labels(outcome)

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose the metrics at ``http://addr:port/metrics`` from a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (tests and the benchmark read counters through this)."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got
