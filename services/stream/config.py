"""The stream consumer's configuration: one typed object, defaults stated once, checked at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from feature_store import spec
from recstack import redis_url
from recstack.errors import UserError
from recstack.kafka import KafkaSecurity


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """Everything ``recstack stream`` needs; the CLI fills it from flags and ``RECSTACK_*`` variables."""

    bootstrap: str = "127.0.0.1:9092"
    redis: str = "redis://127.0.0.1:6379/0"
    group: str = "recstack-stream"
    topic: str = "user-events"
    dlq_topic: str = "user-events.dlq"
    # Parquet event log for retraining; "" turns it off (offsets are then committed per batch).
    event_log: str = "artifacts/events"
    # A second event with the same event_id within this window has no effect (docs/CONTRACT.md section 3).
    dedup_window_s: int = 86_400
    trending_half_life_s: float = field(default_factory=lambda: spec.TRENDING_HALF_LIFE_S)
    # Seconds an event's ts may be ahead of the consumer's clock; later ones are dead letters.
    max_future_skew: float = 300.0
    metrics_port: int = 9465  # 0: no metrics endpoint
    # Loopback unless told otherwise; containers and pods set 0.0.0.0 so Prometheus can scrape it.
    metrics_host: str = "127.0.0.1"
    # Records per poll, hence per atomic Redis write. Bigger batches aggregate more per entity
    # (fewer hash merges per event) but hold Redis longer in one script.
    max_batch: int = 2_000
    poll_timeout_ms: int = 100
    # An event-log part file is closed (and Kafka offsets committed) after this many seconds or rows.
    log_roll_s: float = 30.0
    log_roll_rows: int = 200_000
    # While rolls fail (disk full, read-only), past this many events held in memory the partitions
    # are paused (features stop updating) until a roll succeeds: memory stays bounded.
    eventlog_max_unwritten: int = 1_000_000
    # How soon the group notices a consumer that died without leaving (SIGKILL, power loss).
    session_timeout_ms: int = 10_000
    client_id: str = "recstack-stream"
    # TLS/SASL towards Kafka, for the consumer and its dead-letter producer alike.
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)

    def __post_init__(self) -> None:
        problems = []
        if not self.topic:
            problems.append("--topic must not be empty")
        if not self.dlq_topic or self.dlq_topic == self.topic:
            problems.append("--dlq-topic must be set and differ from --topic")
        if not self.group:
            problems.append("--group must not be empty")
        if self.dedup_window_s < 1:
            problems.append(f"--dedup-window-s must be at least 1, got {self.dedup_window_s}")
        if not self.trending_half_life_s > 0:
            problems.append(f"--trending-half-life-s must be positive, got {self.trending_half_life_s}")
        if not 0 < self.max_future_skew < float("inf"):
            problems.append(
                f"--max-future-skew must be a positive number of seconds, got {self.max_future_skew}"
            )
        if not 0 <= self.metrics_port < 65536:
            problems.append(f"--metrics-port must be 0-65535, got {self.metrics_port}")
        if self.max_batch < 1:
            problems.append(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.poll_timeout_ms < 1:
            problems.append(f"--poll-timeout-ms must be at least 1, got {self.poll_timeout_ms}")
        if not self.log_roll_s > 0 or self.log_roll_rows < 1:
            problems.append("--log-roll-s and --log-roll-rows must be positive")
        if self.eventlog_max_unwritten < self.log_roll_rows:
            problems.append(
                f"--eventlog-max-unwritten ({self.eventlog_max_unwritten}) must be at least "
                f"--log-roll-rows ({self.log_roll_rows})"
            )
        if self.session_timeout_ms < 1_000:
            problems.append(f"--session-timeout-ms must be at least 1000, got {self.session_timeout_ms}")
        try:
            redis_url.check(self.redis, "--redis")
        except UserError as exc:
            problems.append(str(exc))
        host, _, port = self.bootstrap.rpartition(":")
        if not host or not port.isdigit():
            problems.append(f"--bootstrap must be HOST:PORT, got {self.bootstrap!r}")
        if problems:
            raise UserError("invalid stream configuration: " + "; ".join(problems))

    @classmethod
    def from_namespace(cls, args: Any) -> StreamConfig:
        """The config from parsed CLI arguments (attributes named like the fields)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
