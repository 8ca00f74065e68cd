"""The attribution consumer's configuration: one typed object, defaults stated once, checked at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from recstack import redis_url
from recstack.errors import UserError
from recstack.kafka import KafkaSecurity


@dataclass(frozen=True, slots=True)
class AttributionConfig:
    """Everything ``recstack attribute`` needs; the CLI fills it from flags and ``RECSTACK_*`` variables."""

    bootstrap: str = "127.0.0.1:9092"
    redis: str = "redis://127.0.0.1:6379/0"
    group: str = "recstack-attribution"
    impressions_topic: str = "rank-impressions"
    events_topic: str = "user-events"
    # An event without request_id is credited to an impression at most this long before it (event time).
    window_s: float = 1_800.0
    # Impressions of one partition may arrive this much out of ts order: an event waits until the
    # impressions read reach its ts plus this (or until max_wait_s has passed on the clock).
    lateness_s: float = 5.0
    max_wait_s: float = 120.0
    # Impressions kept per user (newest first) and how long their list lives after the last one.
    max_per_user: int = 100
    state_ttl_s: float = 3_600.0
    # Events held per partition before its events are paused (memory stays bounded).
    max_held: int = 100_000
    metrics_port: int = 9466  # 0: no metrics endpoint
    metrics_host: str = "127.0.0.1"
    max_batch: int = 2_000
    poll_timeout_ms: int = 100
    session_timeout_ms: int = 10_000
    client_id: str = "recstack-attribution"
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)

    def __post_init__(self) -> None:
        problems = []
        if not self.impressions_topic or not self.events_topic or self.impressions_topic == self.events_topic:
            problems.append("--impressions-topic and --events-topic must be set and differ")
        if not self.group:
            problems.append("--group must not be empty")
        if not 0 < self.window_s < float("inf"):
            problems.append(f"--window must be a positive duration, got {self.window_s}")
        if not 0 <= self.lateness_s < float("inf") or not 0 <= self.max_wait_s < float("inf"):
            problems.append("--lateness and --max-wait must be durations >= 0")
        if self.max_per_user < 1 or self.max_held < 1 or self.max_batch < 1 or self.poll_timeout_ms < 1:
            problems.append("--max-per-user, --max-held, --max-batch and --poll-timeout-ms must be >= 1")
        if not self.state_ttl_s >= self.window_s:
            problems.append(f"--state-ttl ({self.state_ttl_s}) must be at least --window ({self.window_s})")
        if not 0 <= self.metrics_port < 65536:
            problems.append(f"--metrics-port must be 0-65535, got {self.metrics_port}")
        if self.session_timeout_ms < 1_000:
            problems.append(f"--session-timeout-ms must be at least 1000, got {self.session_timeout_ms}")
        try:
            redis_url.check(self.redis, "--redis")
        except UserError as exc:
            problems.append(str(exc))
        if redis_url.is_cluster(self.redis):
            problems.append("--redis: the attribution consumer needs a single Redis, not a cluster")
        if problems:
            raise UserError("invalid attribution configuration: " + "; ".join(problems))

    @property
    def window_ms(self) -> int:
        return int(self.window_s * 1000)

    @classmethod
    def from_namespace(cls, args: Any) -> AttributionConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
