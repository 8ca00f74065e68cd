"""Impressions: one Kafka record per served list, published without any call waiting on Kafka.

Batches hand their answers to :meth:`ImpressionPublisher.offer_many` as plain tuples (no JSON on
the request path); it appends them to a bounded buffer, or drops and counts them
(``recstack_impressions_dropped_total``) when the buffer is full. That is all a call ever pays.

A background thread owns a kafka-python producer (``acks=all``, lingering ``linger_ms`` to batch):
every ``linger_ms`` it drains the buffer, writes each impression's JSON and sends it keyed by user
(one user's impressions stay in order on one partition, which attribution reads). Acknowledged
records are counted in ``recstack_impressions_published_total``, failed deliveries in
``recstack_impressions_failed_total``: every impression offered ends up in exactly one of the
three counters. A broker that is down at start-up is retried in the background meanwhile; the
buffer fills and drops, counted.

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
        self._next_failure_log = 0.0

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
        except Exception as exc:  # broker down: retry; meanwhile the buffer fills and drops
            log.warning("impressions: cannot reach Kafka (%s); retrying", exc)
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
        buffer, send, topic = self._buffer, self._producer.send, self._topic
        ok, failed = self._delivered, self._failed
        while buffer:
            shown = buffer.popleft()
            try:
                future = send(topic, key=shown[1].encode(), value=impression_json(shown))
            except Exception as exc:  # the producer refused it (closed, too large, its own buffer)
                self._failed(exc)
                continue
            future.add_callback(ok)
            future.add_errback(failed)

    def _delivered(self, _metadata: Any) -> None:
        self._metrics.impressions_published.inc()

    def _failed(self, exc: BaseException) -> None:
        self._metrics.impressions_failed.inc()
        now = time.monotonic()
        if now >= self._next_failure_log:  # a broker outage fails thousands: one line per 10 s
            self._next_failure_log = now + 10.0
            log.warning("impressions: records not delivered (counted in %s): %s", _FAILED_METRIC, exc)

    def _close(self) -> None:
        left = len(self._buffer)
        if left:  # no producer to send them with: counted as not delivered, never lost silently
            self._buffer.clear()
            self._metrics.impressions_failed.inc(left)
        if self._producer is not None:
            try:
                self._producer.flush(timeout=self._close_timeout_s)
            except Exception as exc:
                log.warning("impressions: flush at shutdown failed: %s", exc)
            try:
                self._producer.close(timeout=self._close_timeout_s)
            except Exception as exc:
                log.warning("impressions: closing the producer failed: %s", exc)


def kafka_producer_factory(bootstrap: str, security: Any, linger_ms: float) -> Callable[[], Any]:
    """The producer the publisher owns: acks=all, batched by ``linger_ms``, the given TLS/SASL."""

    def make() -> Any:
        from kafka import KafkaProducer

        return KafkaProducer(
            bootstrap_servers=bootstrap.split(","),
            client_id="recstack-ranking-impressions",
            acks="all",
            linger_ms=int(linger_ms),
            retries=5,
            # send() never blocks the sender thread for long on a full producer buffer or a
            # metadata fetch: it fails, which is counted.
            max_block_ms=5_000,
            request_timeout_ms=10_000,
            **security.client_options(),
        )

    return make
