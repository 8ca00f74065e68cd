"""Publish events to Kafka: key = user_id, value = the event's JSON (docs/CONTRACT.md section 3)."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd

from recstack.events import COLUMNS, Event
from recstack.kafka import KafkaSecurity

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReplayStats:
    events: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def frame_to_events(frame: pd.DataFrame) -> Iterator[Event]:
    """Rows of an event-log frame (``recstack.sources`` columns) -> :class:`Event` objects."""
    for row in frame.reindex(columns=list(COLUMNS)).itertuples(index=False, name=None):
        event_id, user_id, item_id, event_type, ts, price, quantity, category, session_id = row
        yield Event(
            event_id=str(event_id),
            user_id=str(user_id),
            item_id=str(item_id),
            event_type=str(event_type),
            ts_ms=int(ts),
            price=None if _missing(price) else float(price),
            quantity=1 if _missing(quantity) else int(quantity),
            category=None if _missing(category) else str(category),
            session_id=None if _missing(session_id) else str(session_id),
        )


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def publish(
    events: Iterator[Event],
    total: int,
    bootstrap: str,
    topic: str,
    rate: float = 0.0,
    progress: bool = True,
    security: KafkaSecurity | None = None,
) -> ReplayStats:
    """Send ``events`` (``total`` of them) to ``topic``; ``rate`` events/s, 0 = as fast as possible.

    Through :class:`recstack.client.EventPublisher`: each event is checked against the contract
    before it is sent, the producer is idempotent with ``acks=all`` (a retried send is not
    duplicated by the broker; a duplicate that still gets through is absorbed by the consumer's
    event-id dedup), and a failed delivery stops the replay with :class:`PublishError`.
    """
    from tqdm import tqdm

    from recstack.client import EventPublisher

    publisher = EventPublisher(bootstrap, topic, security=security, client_id="recstack-replay")
    sent = 0
    bar = tqdm(
        total=total,
        unit="ev",
        unit_scale=True,
        desc=f"replay -> {topic}",
        disable=not progress,
        file=sys.stderr,
    )
    started = time.monotonic()
    try:
        for event in events:
            if (
                rate > 0 and sent % 100 == 0
            ):  # pace in small steps: sleeping per event costs more than it waits
                ahead = started + sent / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            publisher.publish(event)
            sent += 1
            if sent % 1000 == 0:
                bar.update(1000)
                if publisher.failed:
                    break
        publisher.flush()  # raises PublishError naming how many failed
        bar.update(sent - bar.n)
    finally:
        bar.close()
        publisher.close(timeout_s=30)
    return ReplayStats(events=sent, seconds=time.monotonic() - started)
