"""Impressions: one Kafka record per served list, published without any call waiting on Kafka.

Batches hand their answers to :meth:`ImpressionPublisher.offer_many` as plain tuples (no JSON on
the request path); it appends them to a bounded buffer, or drops and counts them
(``recstack_impressions_dropped_total``) when the buffer is full. That is all a call ever pays.

A background thread owns the producer: every ``linger_ms`` it drains the buffer, writes each
impression's JSON and hands it, keyed by user (one user's impressions stay in order on one
partition, which attribution reads), to librdkafka through confluent-kafka: an idempotent
producer (``acks=all``, retries without duplicates) whose batching, compression and network I/O
run in C threads that do not hold the interpreter lock. A record costs the serving process about
3 µs there, against about 130 µs in kafka-python's pure-Python producer, whose sender thread also
competes with the gRPC threads for the lock (docs/EXPERIMENTS.md, "Cost").

Acknowledged records are counted in ``recstack_impressions_published_total``, records the
producer gave up on (``message.timeout.ms``) in ``recstack_impressions_failed_total``: every
impression offered ends up in exactly one of the three counters, those still queued at shutdown
in "failed". While the broker is away librdkafka holds up to ``max_buffer`` records and retries;
past that the sender stops draining, this buffer fills and drops, counted.

The record (docs/EXPERIMENTS.md, "Contract changes")::

    {"request_id": "…32 hex…", "user_id": "u1", "experiment": "ab", "arm": "A",
     "model_version": "v20240102-000000",   # "experiment" only while one runs
     "items": [{"item_id": "i9", "position": 1}, ...], "ts": 1767225600000,
     "shadow": {"version": "v20240103-000000", "items": [...]}}   # only when a shadow scored it
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from recstack.kafka import KafkaSecurity
from services.ranking.metrics import RankingMetrics

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "rank-impressions"
_FAILED_METRIC = "recstack_impressions_failed_total"
# (request_id, user_id, arm, model_version, item ids best first, ts ms, experiment name or "",
#  [(shadow version, ids)])
Shown = tuple


def _items_json(ids: list[str]) -> str:
    # Written by hand around the C encoder's strings: 2.5x faster than json.dumps of the dicts,
    # and it runs once per answer (measured in docs/EXPERIMENTS.md).
    dumps = json.dumps
    return ",".join([f'{{"item_id":{dumps(i)},"position":{p}}}' for p, i in enumerate(ids, 1)])


def impression_json(shown: Shown) -> bytes:
    request_id, user_id, arm, version, ids, ts, experiment = shown[:7]
    dumps = json.dumps
    shadow = ""
    if len(shown) > 7:
        shadow_version, shadow_ids = shown[7]
        shadow = f',"shadow":{{"version":{dumps(shadow_version)},"items":[{_items_json(shadow_ids)}]}}'
    # No experiment: no field (the attribution consumer counts those under "default").
    exp = f'"experiment":{dumps(experiment)},' if experiment else ""
    return (
        f'{{"request_id":{dumps(request_id)},"user_id":{dumps(user_id)},{exp}"arm":{dumps(arm)},'
        f'"model_version":{dumps(version)},"items":[{_items_json(ids)}],"ts":{int(ts)}{shadow}}}'
    ).encode()


class ImpressionPublisher:
    def __init__(
        self,
        producer_factory: Callable[[], Any],
        topic: str = DEFAULT_TOPIC,
        *,
        max_buffer: int = 10_000,
        linger_ms: float = 20.0,
        metrics: RankingMetrics | None = None,
        close_timeout_s: float = 5.0,
    ) -> None:
        """``producer_factory`` returns a confluent-kafka ``Producer`` (or an object with its
        ``produce``, ``poll`` and ``flush``); see :func:`kafka_producer_factory`."""
        self._factory = producer_factory
        self._topic = topic
        self._max = max_buffer
        self._linger_s = linger_ms / 1000.0
        self._metrics = metrics or RankingMetrics()
        self._close_timeout_s = close_timeout_s
        # deque appends and poplefts are atomic: batch threads append, the sender pops, no lock.
        self._buffer: collections.deque[Shown] = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer: Any = None
        # Delivery reports arrive on the sender thread (inside poll/flush): counted here, then
        # added to the Prometheus counters once per poll instead of once per record.
        self._acked = 0
        self._not_delivered = 0
        self._last_error: Any = None

    # --- request side (batch threads) ---------------------------------------------------------
    def offer_many(self, shown: Iterable[Shown]) -> None:
        """Queue impressions for publication; never blocks. A full buffer drops (counted)."""
        buffer = self._buffer
        dropped = 0
        for record in shown:
            if len(buffer) >= self._max:
                dropped += 1
            else:
                buffer.append(record)
        if dropped:
            self._metrics.impressions_dropped.inc(dropped)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # --- sender thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="impressions", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send what is buffered (up to ``close_timeout_s``), then close the producer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._close_timeout_s + 5.0)

    def _connect(self) -> bool:
        try:
            self._producer = self._factory()
        except Exception as exc:  # a configuration librdkafka refuses: retried, logged each time
            log.warning("impressions: cannot create the Kafka producer (%s); retrying", exc)
            return False
        log.info("impressions: publishing to %s", self._topic)
        return True

    def _run(self) -> None:
        retry_at = 0.0
        while True:
            stopping = self._stop.is_set()
            if self._producer is None:
                if stopping:
                    break
                if time.monotonic() >= retry_at and not self._connect():
                    retry_at = time.monotonic() + 1.0
            if self._producer is not None:
                self._drain()
            if stopping:
                break
            self._stop.wait(self._linger_s)
        self._close()

    def _drain(self) -> None:
        buffer, producer, topic = self._buffer, self._producer, self._topic
        produce, reported = producer.produce, self._reported
        while buffer:
            shown = buffer.popleft()
            try:
                produce(topic, impression_json(shown), shown[1].encode(), on_delivery=reported)
            except BufferError:  # librdkafka holds max_buffer records already (broker away)
                buffer.appendleft(shown)  # kept here; this buffer fills and drops, counted
                break
            except Exception as exc:  # refused outright (too large, producer closing)
                self._not_delivered += 1
                self._last_error = exc
        producer.poll(0)  # delivery reports: the callbacks below, on this thread
        self._count()

    def _reported(self, err: Any, _msg: Any) -> None:
        if err is None:
            self._acked += 1
        else:
            self._not_delivered += 1
            self._last_error = err

    def _count(self) -> None:
        acked, failed = self._acked, self._not_delivered
        if acked:
            self._acked = 0
            self._metrics.impressions_published.inc(acked)
        if failed:
            self._not_delivered = 0
            self._metrics.impressions_failed.inc(failed)
            # A broker outage fails thousands: one line per RATE_LIMIT_S.
            _rate_limited("delivery").warning(
                "impressions: %d records not delivered (counted in %s): %s",
                failed,
                _FAILED_METRIC,
                self._last_error,
            )

    def _close(self) -> None:
        left = len(self._buffer)
        if left:  # no producer to send them with: counted as not delivered, never lost silently
            self._buffer.clear()
            self._not_delivered += left
        if self._producer is not None:
            try:
                # Delivery reports arrive inside flush() (the callbacks add to the counts), so
                # its result is read first: what the broker has not acknowledged by then.
                unacknowledged = self._producer.flush(self._close_timeout_s)
                self._not_delivered += unacknowledged
            except Exception as exc:
                log.warning("impressions: flush at shutdown failed: %s", exc)
        self._count()


RATE_LIMIT_S = 10.0


class _RateLimit(logging.Filter):
    """Lets one record through per ``interval_s``; says how many it held back since the last."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._next = 0.0
        self._held = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._held += 1
                return False
            self._next = now + self._interval_s
            held, self._held = self._held, 0
        if held:
            record.msg = f"{record.msg} ({held} more lines held back)"
        return True


def _rate_limited(name: str) -> logging.Logger:
    """The child logger ``name`` of this module's, letting through one line per RATE_LIMIT_S."""
    logger = logging.getLogger(f"{__name__}.{name}")
    if not any(isinstance(f, _RateLimit) for f in logger.filters):
        logger.addFilter(_RateLimit(RATE_LIMIT_S))
    return logger


def librdkafka_security(security: KafkaSecurity) -> dict[str, Any]:
    """The project's Kafka security settings as librdkafka configuration properties."""
    config: dict[str, Any] = {"security.protocol": security.protocol.lower()}
    if security.protocol.startswith("SASL_"):
        config.update(
            {
                "sasl.mechanism": security.sasl_mechanism,
                "sasl.username": security.sasl_username,
                "sasl.password": security.sasl_password,
            }
        )
    if security.protocol in ("SSL", "SASL_SSL"):
        for prop, path in (
            ("ssl.ca.location", security.ssl_cafile),
            ("ssl.certificate.location", security.ssl_certfile),
            ("ssl.key.location", security.ssl_keyfile),
        ):
            if path:
                config[prop] = path
    return config


def kafka_producer_factory(
    bootstrap: str,
    security: KafkaSecurity,
    linger_ms: float,
    *,
    max_buffer: int = 10_000,
    delivery_timeout_ms: int = 60_000,
) -> Callable[[], Any]:
    """The producer the publisher owns: idempotent (acks=all), batched by ``linger_ms``, holding
    at most ``max_buffer`` records, giving a record up (counted as failed) after
    ``delivery_timeout_ms`` without the broker's acknowledgement."""

    def make() -> Any:
        from confluent_kafka import Producer

        return Producer(
            {
                "bootstrap.servers": bootstrap,
                "client.id": "recstack-ranking-impressions",
                "enable.idempotence": True,
                # The Java client's (and kafka-python's) partitioner: a user's impressions go to
                # the partition number their events go to, which attribution relies on.
                # librdkafka's own default (consistent_random, CRC32) would scatter them.
                "partitioner": "murmur2_random",
                "acks": "all",
                "linger.ms": max(0.0, float(linger_ms)),
                # Uncompressed: the project's kafka-python consumers (attribution, reports) read
                # gzip only without extra codecs, and gzip would cost more CPU than it saves here.
                "compression.type": "none",
                "queue.buffering.max.messages": max(1, int(max_buffer)),
                "message.timeout.ms": int(delivery_timeout_ms),
                # librdkafka's own log lines (a broker away logs one per reconnect attempt),
                # at most one per RATE_LIMIT_S.
                "logger": _rate_limited("librdkafka"),
                **librdkafka_security(security),
            }
        )

    return make
