"""Dead letters: malformed records sent to the DLQ topic, and what happens when it does not take them.

Every record the consumer refuses (``recstack.events`` names the reason) is sent to ``--dlq-topic``
with its key and value and these headers: ``error`` (the reason), ``source-topic``,
``source-partition``, ``source-offset``, ``original-size`` (bytes of the value) and
``original-sha256`` (hex SHA-256 of the value). A dead letter is acknowledged before the
batch's offsets move, so it is at least once, never lost (``docs/FEATURES.md``).

When the DLQ topic refuses a dead letter:

* **too large** (the producer's ``max_request_size`` or the topic's ``max.message.bytes``, once
  the headers are added), or another refusal of the record itself: it is sent again *truncated*:
  the value cut (to what fits the producer's limit and at most half, then to a quarter at each
  refusal, down to nothing), the key cut to 256 bytes, and a ``truncated`` header saying so;
  ``original-size`` and ``original-sha256`` still account for the whole record. Bounded: about
  ten attempts for a 1 MB record.
* **topic missing, not authorized, not enough replicas, timed out** (or refused even as an empty
  truncated letter): it cannot be sent now. The consumer *holds* the partition: it is seeked
  back to the record and paused (other partitions go on), nothing past the record is applied
  or committed, ``recstack_stream_dlq_send_failures_total`` counts the attempts and
  ``recstack_stream_dlq_held_partitions`` the held partitions; it retries after 1 s, doubling
  up to 30 s. No record is ever skipped.

The producer never creates the DLQ topic (an operator creates it, with its retention): a missing
topic stops the consumer at start-up (:func:`require_topic`) and holds partitions later.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import kafka.errors as kafka_errors
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from recstack.errors import UserError
from services.stream.config import StreamConfig
from services.stream.metrics import StreamMetrics

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1024 * 1024  # kafka-python's default, the broker's default message size
_KEY_KEEP = 256  # a truncated dead letter keeps at most this much of the key
_ERROR_KEEP = 1_000  # ... and of the reason
_ACK_TIMEOUT_S = 30.0
_METADATA_WAIT_MS = 5_000  # a send to a topic missing from the metadata waits this long, then fails
_HOLD_FIRST_S = 1.0
_HOLD_MAX_S = 30.0

# A record the topic refuses for its size: a shorter one may pass.
_SIZE_ERRORS = (kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError)
# Refusals about the topic, not the record: cutting the record does not help.
_TOPIC_ERRORS = (
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.InvalidTopicError,
    kafka_errors.IllegalStateError,
)


def make_producer(config: StreamConfig) -> KafkaProducer:
    """The dead-letter producer: acknowledged by every in-sync replica, never creating the topic."""
    producer = KafkaProducer(
        bootstrap_servers=config.bootstrap,
        client_id=f"{config.client_id}-dlq",
        acks="all",
        retries=10,
        linger_ms=5,
        # Idempotence makes kafka-python treat a MESSAGE_TOO_LARGE answer as fatal: every later
        # send of the producer fails. Dead letters are at least once anyway (source headers
        # identify a repeat), so a plain producer it is.
        enable_idempotence=False,
        max_request_size=MAX_REQUEST_BYTES,
        max_block_ms=_METADATA_WAIT_MS,
        request_timeout_ms=10_000,
        delivery_timeout_ms=20_000,  # a retried send fails within this, before the wait below ends
        allow_auto_create_topics=False,
        **config.kafka_security.client_options(),
    )
    # kafka-python 3.0.12 builds the producer's metadata without allow_auto_create_topics, so its
    # metadata requests would still create a missing topic on a broker that allows it.
    metadata = getattr(producer, "_metadata", None)
    if metadata is not None and "allow_auto_create_topics" in getattr(metadata, "config", {}):
        metadata.config["allow_auto_create_topics"] = False
    return producer


# A topic created a moment ago (by `make up`, a deployment's job, a test) may not be in the
# metadata a broker hands out yet: ask again for this long before calling it missing.
TOPIC_VISIBLE_WAIT_S = 10.0


def require_topic(
    consumer: KafkaConsumer, config: StreamConfig, wait_s: float = TOPIC_VISIBLE_WAIT_S
) -> None:
    """Stop at start-up, naming the topic, when the DLQ topic does not exist (KafkaError: no answer)."""
    deadline = time.monotonic() + wait_s
    while config.dlq_topic not in consumer.topics():
        if time.monotonic() >= deadline:
            raise UserError(
                f"the dead-letter topic {config.dlq_topic!r} does not exist on Kafka at {config.bootstrap} "
                "(or this client may not describe it): create it (e.g. `python infra/kafka/admin.py "
                f"--bootstrap {config.bootstrap} --topic {config.dlq_topic}:6`, or your Kafka tooling) or "
                "point --dlq-topic / RECSTACK_DLQ_TOPIC at an existing topic"
            )
        time.sleep(0.5)


@dataclass(frozen=True, slots=True)
class Letter:
    """A refused record on its way to the DLQ."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    error: str


class DeadLetters:
    """Sends dead letters (whole, else truncated) and says which partitions must wait."""

    def __init__(
        self,
        producer: KafkaProducer,
        config: StreamConfig,
        metrics: StreamMetrics,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.producer = producer
        self._dlq = config.dlq_topic
        self._source = config.topic.encode()
        self._metrics = metrics
        self._max_request_bytes = max_request_bytes
        # Letters sent while an earlier one of their partition could not be: the partition is
        # read again from that earlier record, and these are not sent twice.
        self._ahead: set[tuple[int, int]] = set()

    def send(self, letters: Sequence[Letter]) -> dict[int, tuple[int, str]]:
        """Send ``letters`` and wait for their acknowledgements. Returns, for each partition with
        a letter that could not be sent, the offset of its first such letter and why."""
        todo = []
        for letter in letters:
            mark = (letter.partition, letter.offset)
            if mark in self._ahead:
                self._ahead.discard(mark)
            else:
                todo.append(letter)
        if not todo:
            return {}
        failed: list[tuple[Letter, Exception]] = []
        pending = []
        unsendable: Exception | None = None  # the topic itself is missing or refused: stop trying
        for letter in todo:
            if unsendable is not None:
                failed.append((letter, unsendable))
                continue
            try:
                pending.append((letter, self._send(letter, _headers(letter, self._source), letter.key)))
            except kafka_errors.KafkaError as exc:  # too large for the producer, or no metadata
                failed.append((letter, exc))
                if not _record_error(exc):
                    unsendable = exc
        sent: list[Letter] = []
        if pending:
            self._flush()
            for letter, future in pending:
                try:
                    future.get(timeout=_ACK_TIMEOUT_S)
                    sent.append(letter)
                except kafka_errors.KafkaError as exc:
                    failed.append((letter, exc))
        held: dict[int, tuple[int, str]] = {}
        for letter, exc in sorted(failed, key=lambda f: (f[0].partition, f[0].offset)):
            if letter.partition in held:  # a later letter of a held partition waits for it
                continue
            self._metrics.dlq_send_failures.inc()
            if _record_error(exc):
                exc = self._send_truncated(letter, exc)
                if exc is None:
                    sent.append(letter)
                    continue
            held[letter.partition] = (letter.offset, f"{type(exc).__name__}: {exc}")
        for letter in sent:
            hold = held.get(letter.partition)
            if hold is not None and letter.offset > hold[0]:
                self._ahead.add((letter.partition, letter.offset))
        return held

    def forget(self, partitions: set[int]) -> None:
        """Partitions given up: their next owner sends their dead letters."""
        self._ahead = {mark for mark in self._ahead if mark[0] not in partitions}

    def _send(self, letter: Letter, headers: list[tuple[str, bytes]], key: bytes | None, value=None):
        body = letter.value if value is None else value
        # A record with neither key nor value cannot be produced: its dead letter has an empty value.
        return self.producer.send(self._dlq, key=key, value=b"" if body is None else body, headers=headers)

    def _flush(self) -> None:
        try:
            self.producer.flush(timeout=_ACK_TIMEOUT_S)
        except kafka_errors.KafkaTimeoutError:
            pass  # each future says what became of its letter

    def _send_truncated(self, letter: Letter, refused: Exception) -> Exception | None:
        """Send ``letter`` cut to fit, smaller at each size refusal. None once sent; else the last refusal."""
        value = letter.value or b""
        key = letter.key[:_KEY_KEEP] if letter.key is not None else None
        headers = _headers(letter, self._source)
        room = self._max_request_bytes - 512 - len(key or b"") - sum(len(k) + len(v) for k, v in headers)
        keep = max(0, min(room, len(value) // 2))
        while True:
            why = (
                f"value cut to {keep} of {len(value)} bytes"
                + (
                    f", key to {len(key or b'')} of {len(letter.key or b'')} bytes"
                    if key != letter.key
                    else ""
                )
                + f": the whole record was refused ({type(refused).__name__})"
            )
            try:
                future = self._send(letter, [*headers, ("truncated", why.encode())], key, value[:keep])
                self._flush()
                future.get(timeout=_ACK_TIMEOUT_S)
            except kafka_errors.KafkaError as exc:
                self._metrics.dlq_send_failures.inc()
                if not isinstance(exc, _SIZE_ERRORS) or keep == 0:
                    return exc
                refused = exc
                keep //= 4
                continue
            self._metrics.dlq_truncated.inc()
            log.warning(
                "dead letter of %s:%d:%d sent truncated (%s)",
                self._source.decode(),
                letter.partition,
                letter.offset,
                why,
            )
            return None


def _headers(letter: Letter, source_topic: bytes) -> list[tuple[str, bytes]]:
    value = letter.value or b""
    return [
        ("error", letter.error[:_ERROR_KEEP].encode("utf-8", "replace")),
        ("source-topic", source_topic),
        ("source-partition", str(letter.partition).encode()),
        ("source-offset", str(letter.offset).encode()),
        ("original-size", str(len(value)).encode()),
        ("original-sha256", hashlib.sha256(value).hexdigest().encode()),
    ]


def _record_error(exc: Exception) -> bool:
    """A refusal of this record (a shorter one may pass), not of the topic or the moment."""
    if isinstance(exc, _SIZE_ERRORS):
        return True
    return not getattr(exc, "retriable", False) and not isinstance(exc, _TOPIC_ERRORS)


@dataclass(slots=True)
class _Hold:
    offset: int  # the record whose dead letter could not be sent
    delay: float
    retry_at: float
    resumed: bool = False  # fetching again to retry; cleared if the letter fails again


class Holds:
    """Partitions paused at a record whose dead letter could not be sent, retried with backoff."""

    def __init__(self, config: StreamConfig, metrics: StreamMetrics) -> None:
        self._topic = config.topic
        self._dlq = config.dlq_topic
        self._metrics = metrics
        self._holds: dict[int, _Hold] = {}

    def __bool__(self) -> bool:
        return bool(self._holds)

    def hold(self, consumer: KafkaConsumer, partition: int, offset: int, reason: str) -> None:
        """Seek the partition back to the record and pause it until the next retry."""
        old = self._holds.get(partition)
        delay = min(old.delay * 2, _HOLD_MAX_S) if old is not None else _HOLD_FIRST_S
        self._holds[partition] = _Hold(offset, delay, time.monotonic() + delay)
        tp = TopicPartition(self._topic, partition)
        consumer.seek(tp, offset)
        consumer.pause(tp)
        self._metrics.dlq_held.set(len(self._holds))
        log.error(
            "dead letter of %s:%d:%d could not be sent to %s (%s); partition %d holds at that record "
            "(nothing past it is applied or committed) and retries in %.0f s",
            self._topic,
            partition,
            offset,
            self._dlq,
            reason,
            partition,
            delay,
        )

    def limits(self) -> dict[int, int]:
        """Held partitions not fetching again yet -> the offset from which their records wait."""
        return {p: h.offset for p, h in self._holds.items() if not h.resumed}

    def waiting(self) -> set[TopicPartition]:
        return {TopicPartition(self._topic, p) for p, h in self._holds.items() if not h.resumed}

    def tick(self, consumer: KafkaConsumer, positions: dict[int, int], can_resume: bool) -> None:
        """Clear holds whose record was dealt with; resume the partitions whose retry is due
        (once the DLQ topic exists: a missing one costs a metadata request, not a blocked send)."""
        for p in [p for p, h in self._holds.items() if positions.get(p, -1) > h.offset]:
            log.warning("partition %d: the held dead letter was sent; going on", p)
            del self._holds[p]
        now = time.monotonic()
        due = [p for p, h in self._holds.items() if not h.resumed and h.retry_at <= now]
        if due and can_resume:
            try:
                exists = self._dlq in consumer.topics()
            except kafka_errors.KafkaError as exc:
                log.warning("checking the dead-letter topic %s failed (%s)", self._dlq, exc)
                exists = False
            for p in due:
                hold = self._holds[p]
                if exists:
                    hold.resumed = True
                    consumer.resume(TopicPartition(self._topic, p))
                else:
                    self._metrics.dlq_send_failures.inc()
                    hold.delay = min(hold.delay * 2, _HOLD_MAX_S)
                    hold.retry_at = now + hold.delay
                    log.error(
                        "partition %d still holds at offset %d: the dead-letter topic %s does not exist; "
                        "retrying in %.0f s",
                        p,
                        hold.offset,
                        self._dlq,
                        hold.delay,
                    )
        self._metrics.dlq_held.set(len(self._holds))

    def forget(self, partitions: set[int]) -> None:
        for p in partitions:
            self._holds.pop(p, None)
        self._metrics.dlq_held.set(len(self._holds))
