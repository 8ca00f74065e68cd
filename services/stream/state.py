"""What the stream consumer's parts share: the state every part reads (Redis, the Kafka client,
the partitions' fences and positions), the stop request, Kafka commits and the retry loop for
Redis calls.

:class:`services.stream.consumer.StreamConsumer` is built from layers, one module each, each
calling only into those beneath it: the Kafka side (:mod:`services.stream.kafka_side`) polls
and handles rebalances, and hands batches to the apply pipeline (:mod:`services.stream.pipeline`),
which writes through the event-log fence (:mod:`services.stream.fence`), which rests on this
base. Each layer initialises its own state in ``__init__`` after ``super().__init__``.
"""

from __future__ import annotations

import logging
import threading

import prometheus_client  # noqa: F401  (before Feast)
import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from redis.exceptions import RedisClusterException

from feature_store.cluster import ClusterFeatureWriter
from feature_store.writes import FeatureWriter
from recstack import redis_url as redis_urls
from services.stream import deadletter
from services.stream.config import StreamConfig
from services.stream.eventlog import EventLog
from services.stream.keys import applied_key
from services.stream.metrics import StreamMetrics

# Every part logs under the consumer's name, as before the parts had modules of their own: the
# name is in each log line, and operators filter on it.
log = logging.getLogger("services.stream.consumer")

BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 5.0


class Stopping(Exception):
    """Stop was requested while a batch was still waiting for Redis or Kafka: abandon it uncommitted."""


class ConsumerState:
    """The state shared by the consumer's parts (see the module docstring)."""

    def __init__(self, config: StreamConfig, metrics: StreamMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or StreamMetrics()
        self._stop = threading.Event()
        self._cluster = redis_urls.is_cluster(config.redis)
        self._redis = redis_urls.connect(config.redis, socket_timeout=10, socket_connect_timeout=5)
        writer = ClusterFeatureWriter if self._cluster else FeatureWriter
        self._writer = writer(self._redis, config.trending_half_life_s)
        self._applied_key = applied_key(config.topic)
        self._event_log = (
            EventLog(config.event_log, config.log_roll_rows, config.log_roll_s) if config.event_log else None
        )
        self._applied: dict[int, int] = {}  # partition -> last applied offset, as last seen in Redis
        self._logged: dict[int, int] = {}  # partition -> last offset in rolled event-log files
        self._position: dict[int, int] = {}  # partition -> next offset after what was processed
        self._consumer: KafkaConsumer | None = None
        self._dead_letters: deadletter.DeadLetters | None = None
        self._holds = deadletter.Holds(config, self.metrics)  # partitions whose dead letter waits
        self._paused = False  # partitions paused: too many events wait for the event log
        # A Redis error since the fences were last read back calls for reading them at once: Redis
        # may have come back with writes lost (see EventLogFence._check_fences).
        self._fences_suspect = False

    def stop(self) -> None:
        """Ask the loop to finish its batch, roll the event log, commit and leave the group."""
        self._stop.set()

    def _commit(self, positions: dict[int, int], sync: bool) -> None:
        """Commit next-offsets to Kafka (a convenience: Redis holds the offsets that matter)."""
        assert self._consumer is not None
        offsets = {
            TopicPartition(self.config.topic, p): OffsetAndMetadata(pos, "", -1)
            for p, pos in positions.items()
            if pos >= 0
        }
        if not offsets:
            return
        try:
            if sync:
                self._consumer.commit(offsets)
            else:
                self._consumer.commit_async(offsets)
        except KafkaError as exc:
            log.warning("offset commit failed (%s); continuing", exc)

    def _with_retries(self, call):
        """``call()`` until Redis answers, backing off; :class:`Stopping` if asked to stop meanwhile."""
        return retry_redis(call, self._stop, self._redis_failed)

    def _redis_failed(self) -> None:
        self.metrics.redis_retries.inc()
        self._fences_suspect = True


def retry_redis(call, stop: threading.Event, on_failure=None):
    """``call()`` until Redis answers, backing off (``on_failure()`` after each error);
    :class:`Stopping` if ``stop`` is set meanwhile. Shared with the attribution consumer."""
    delay = BACKOFF_START_S
    while True:
        try:
            return call()
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            if on_failure is not None:
                on_failure()
            log.warning("Redis call failed (%s); retrying in %.1fs", exc, delay)
            if stop.wait(delay):
                raise Stopping from exc
            delay = min(delay * 2, BACKOFF_MAX_S)
