"""The stream consumer: Kafka ``user-events`` -> features in Redis, each valid event applied exactly once.

How exactly-once works (the full argument is in ``docs/FEATURES.md``):

* **Offset fence.** Redis holds, per partition, the last offset whose effects are in the features
  (``recstack:stream:<topic>:applied``). Each batch is ONE Lua script call
  (:class:`feature_store.writes.FeatureWriter`) that checks those offsets still hold what this
  consumer expects, checks and sets the event-id dedup keys, merges the batch into the feature
  hashes and stores the new offsets, atomically. A record at or below the stored offset is never
  applied again, whoever reads it and however often.
* **Dedup.** ``recstack:eid:<digest of event_id>`` (TTL = dedup window) marks an applied event id;
  its value names the record that applied it (``topic:partition:offset``).
* **Event log.** Applied events are buffered and rolled into Parquet files. Redis also keeps, per
  partition, the last offset whose events are in rolled files (``...:logged``); a consumer taking
  a partition over starts reading right after it, so events applied but lost from a crashed
  buffer are read again: the fence stops them from being applied twice, and they are logged if
  their dedup key says this very record applied them. Kafka offsets are committed at each roll.
  The log is fenced by ownership: taking a partition sets a fresh token for it in Redis, and a
  roll's files (staged under temporary names) become part of the log only through one script
  that checks every partition in them is still ours, raises their logged offsets and records the
  roll; a refused roll is deleted and its events left to the partitions' new owner.
* **Lost writes.** A Redis that loses acknowledged writes (restart from an old AOF/RDB file,
  failover to a lagging replica) comes back with fences behind what this consumer applied. The
  fences are read back every few seconds and after every Redis error, and a batch refuses a fence
  behind; those partitions are read again from the stored offset + 1, the event log keeping each
  event once (``EventLogFence._check_fences``).
* **Redis Cluster** (``--redis redis+cluster://...``): event ids are claimed for their records
  before any write, and each node gets one script guarded by per-slot fences
  (:mod:`feature_store.cluster`); the partition's applied offset moves once every node has written.
* **Dead letters** are sent and acknowledged before the batch's offsets are stored, so a crash
  can repeat a dead letter (at least once, identified by its source headers) but never lose one.
  One the DLQ topic refuses is sent truncated; one that cannot be sent (topic missing) holds its
  partition at that record, paused and retried (:mod:`services.stream.deadletter`).

Code: this module runs the loop; the consumer's parts are layered classes, one module each:
:mod:`services.stream.kafka_side` (the Kafka client: polls, group membership, rebalances),
:mod:`services.stream.pipeline` (a batch from validation to its write, dead letters, booking),
:mod:`services.stream.fence` (event-log ownership and rolls, the lost-writes check) and
:mod:`services.stream.state` (what they share); :mod:`services.stream.keys` names the Redis keys.

Threads: the main thread polls, parses, plans and aggregates; one writer thread runs the batch's
script while the main thread polls and parses the next batch (which is planned only once that
write is done, since its fence expects it); one thread writes event-log files. kafka-python runs
the rebalance callbacks on its IO thread while the main thread waits inside ``poll``.
"""

from __future__ import annotations

import gc
import signal
from typing import Any

import prometheus_client  # noqa: F401  (before Feast)
import redis
from kafka.errors import KafkaError
from redis.exceptions import RedisClusterException

from recstack.credentials import check_redis_auth, redact_url
from services.stream.config import StreamConfig
from services.stream.kafka_side import KafkaSide
from services.stream.metrics import StreamMetrics
from services.stream.pipeline import Batch
from services.stream.state import Stopping, log


class StreamConsumer(KafkaSide):
    """Runs until :meth:`stop` (or SIGTERM/SIGINT through :func:`run`); see the module docstring.
    Built from the Kafka side, the apply pipeline and the event-log fence, in that order of layers."""

    def run(self) -> None:
        cfg = self.config
        self._connect()
        self._require_dlq_topic()
        self._resolve_leftovers()
        self._subscribe()
        log.info(
            "consuming %s as group %s (redis %s, kafka %s)",
            cfg.topic,
            cfg.group,
            redact_url(cfg.redis),
            cfg.kafka_security.describe(),
        )
        try:
            while not self._stop.is_set():
                batch = self._poll()
                if batch is None:
                    continue
                # Parse this batch while the previous one's Redis write is still running, then
                # finish that write before planning this one (its fence expects that write).
                started = Batch.parse(batch, cfg.max_future_skew) if batch else None
                self._finish_inflight()
                started = self._check_fences(started)
                if started is not None:
                    self._inflight = self._begin(started)
                if self._event_log is not None:
                    self._finish_roll(main_thread=True)
                    self._settle_pending()
                    if self._event_log.due():
                        self._start_roll()
                    self._backpressure()
                self._update_lag()
        except Stopping:
            log.info("stopping with a batch not applied; it will be read again")
        finally:
            try:
                self._finish_inflight()
            except Stopping:
                log.info("stopping with a batch not applied; it will be read again")
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            if self._event_log is not None:
                self._roll(main_thread=True)
                self._settle_pending()
            elif self._consumer is not None:
                self._commit(dict(self._position), sync=True)
        except (Stopping, redis.RedisError, RedisClusterException, KafkaError) as exc:
            log.warning("final roll/commit failed (%s); the next owner re-reads from the last one", exc)
        if self._consumer is not None:
            self._consumer.close(autocommit=False)  # leaves the group: partitions move at once
        if self._dead_letters is not None:
            self._dead_letters.producer.close(timeout=10)
        self._executor.shutdown(wait=True)
        self._log_executor.shutdown(wait=True)
        if self._event_log is not None:
            self._event_log.close()  # temporaries left (a roll not settled) are resolved by the next start
        self._redis.close()
        log.info("stream consumer stopped")


def run(config: StreamConfig) -> int:
    """Run a consumer in this process until SIGTERM/SIGINT; exit code 0 after a clean stop."""
    check_redis_auth(config.redis)  # a wrong password stops here, with the setting to fix
    metrics = StreamMetrics()
    if config.metrics_port:
        metrics.serve(config.metrics_port, config.metrics_host)
    consumer = StreamConsumer(config, metrics)

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the batch, then stopping", signum)
        consumer.stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # Everything imported so far (Feast, pandas, torch: ~300,000 objects) lives as long as the
    # process: keep it out of the collector's full passes, which otherwise pause the stream for
    # tenths of a second; and collect the young generations less often at 20,000 events/s.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    try:
        consumer.run()
    except Stopping:
        pass
    return 0
