"""``EventPublisher``: storefront events into Kafka, checked against the event contract first.

Each event goes through :func:`recstack.events.validate`, the very check the stream consumer
applies, so an event the consumer would dead-letter is refused here with
:class:`recstack.events.InvalidEvent` naming the field, before it leaves the process. Records
are keyed by ``user_id`` (one user's events stay in order on one partition). The producer is
idempotent with ``acks=all``: a send the client retries after a lost acknowledgement is written
once. Sends are batched (``linger_ms``, ``batch_size``); :meth:`EventPublisher.flush` waits for
every acknowledgement and raises :class:`PublishError` if any send failed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from recstack.events import Event, validate
from recstack.kafka import KafkaSecurity

# The producer settings every publisher starts from; keyword arguments override them.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    # kafka-python (3.0 here) has the idempotent producer: the broker drops a re-sent batch by
    # its producer id and sequence number, and the sender keeps one batch per partition in
    # flight, so a retry neither duplicates nor reorders. Set explicitly, a conflicting override
    # (acks=1, retries=0) raises KafkaConfigurationError instead of quietly turning it off.
    "enable_idempotence": True,
    "linger_ms": 20,
    "batch_size": 256 * 1024,
}


def encode(event: Event | Mapping[str, Any]) -> tuple[bytes, bytes]:
    """The record of a valid event: (key = user_id, value = the contract's JSON), or
    :class:`recstack.events.InvalidEvent` naming the field that breaks the contract."""
    obj = event.to_json_dict() if isinstance(event, Event) else event
    checked = validate(dict(obj) if isinstance(obj, Mapping) else obj)
    return checked.user_id.encode(), checked.to_json_bytes()


class PublishError(RuntimeError):
    """Sends the broker never acknowledged; ``errors`` holds each one's exception."""

    def __init__(self, topic: str, errors: list[BaseException]) -> None:
        self.errors = errors
        super().__init__(f"{len(errors)} event(s) could not be published to {topic}: {errors[0]!r}")


class EventPublisher:
    """Publishes events to ``topic``; a context manager (flushes, then closes).

    ``security`` gives TLS/SASL settings exactly as every other Kafka client of the project
    (:class:`recstack.kafka.KafkaSecurity`); ``producer_options`` override
    :data:`PRODUCER_DEFAULTS` or add any kafka-python producer option.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str = "user-events",
        *,
        security: KafkaSecurity | None = None,
        client_id: str = "recstack-publisher",
        **producer_options: Any,
    ) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        options = {**PRODUCER_DEFAULTS, **producer_options}
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            **options,
            **(security or KafkaSecurity()).client_options(),
        )
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self.sent = 0

    def publish(self, event: Event | Mapping[str, Any]) -> Any:
        """Validate ``event`` (an :class:`Event` or the contract's JSON object) and send it.

        Returns kafka-python's future (add callbacks for the partition and offset). Raises
        :class:`recstack.events.InvalidEvent` naming the field when the event breaks the contract.
        """
        return self._send(*encode(event))

    def publish_raw(self, key: bytes, value: bytes | None) -> Any:
        """Send bytes as they are, unchecked: only for fault injection (the chaos run's
        malformed records), never for real events."""
        return self._send(key, value)

    def _send(self, key: bytes, value: bytes | None) -> Any:
        future = self._producer.send(self.topic, key=key, value=value)
        future.add_errback(self._on_error)
        self.sent += 1
        return future

    def _on_error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    @property
    def failed(self) -> int:
        """Sends that failed so far (not yet raised by :meth:`flush`)."""
        with self._lock:
            return len(self._errors)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every send is acknowledged or failed; raise :class:`PublishError` for the
        failed ones (each failure is raised once)."""
        self._producer.flush(timeout=timeout_s)
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise PublishError(self.topic, errors)

    def close(self, timeout_s: float = 30.0) -> None:
        self._producer.close(timeout=timeout_s)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()
