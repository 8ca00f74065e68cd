"""Steady event traffic with a known truth: storefront events into Kafka at a fixed rate, with
producer duplicates (the same record sent twice, as a retry would) and malformed records.

Every record the broker acknowledges is kept with its partition and offset: the valid events are
the input of the truth (:mod:`loadtests.chaos.truth`), the malformed ones what the dead-letter
topic must hold. The entity ids carry the run's id, so the truth covers every key it checks even
in a Redis database that holds other data.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from loadtests.chaos.stack import set_thread_priority
from loadtests.chaos.truth import Acked
from recstack.client import EventPublisher, PublishError
from recstack.events import Event

# Records the consumer must send to the dead-letter topic, one per rule of docs/CONTRACT.md section 3.
MALFORMED: tuple[bytes | None, ...] = (
    b"{not json",
    b"[1, 2]",
    b'{"event_id":"m","item_id":"i","event_type":"view","ts":1}',
    b'{"event_id":"m","user_id":"u","item_id":"i","event_type":"click","ts":1}',
    b'{"event_id":"m","user_id":"u","item_id":"i","event_type":"view","ts":"yesterday"}',
    b'{"event_id":"m","user_id":"u","item_id":"i","event_type":"view","ts":1,"price":-1}',
    b'{"event_id":"","user_id":"u","item_id":"i","event_type":"view","ts":1}',
    b"\xff\xfe\x00",
    None,
)
T = TypeVar("T")

_TYPES = ("view", "add_to_cart", "purchase")
_TYPE_P = (0.85, 0.10, 0.05)


@dataclass
class TrafficStats:
    sent: int = 0  # records handed to the producer (valid, duplicates and malformed)
    valid: int = 0
    duplicates: int = 0
    malformed: int = 0
    failures: list[str] = field(default_factory=list)  # sends the broker never acknowledged


class EventTraffic:
    """A producer thread sending events at ``rate`` per second while active."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        run_id: str,
        rate: float,
        dup_share: float,
        bad_share: float,
        n_users: int = 400,
        n_items: int = 300,
        seed: int = 0,
        priority: str = "normal",
        followup: Callable[[str, list[str]], tuple[str, list[str]] | None] | None = None,
        followup_every: int = 40,
    ) -> None:
        self.topic = topic
        self.run_id = run_id
        self.rate = rate
        self.dup_share = dup_share
        self.bad_share = bad_share
        self.users = [f"{run_id}-u{i}" for i in range(n_users)]
        self.items = [f"{run_id}-i{i}" for i in range(n_items)]
        popularity = 1.0 / np.arange(1, n_items + 1) ** 1.1
        self._item_p = popularity / popularity.sum()
        self._rng = np.random.default_rng(seed)
        self._priority = priority
        # Every followup_every-th event, a ranked call for its user (followup: the answer's
        # request id and items) and an action on a shown item: with the request id every other
        # time, else credited by user, item and time window (both attribution paths).
        self._followup = followup
        self._followup_every = followup_every
        self.followup_events = 0
        # Built on a thread at the traffic's priority: the producer's I/O thread inherits it.
        # EventPublisher's idempotent acks=all producer; its errors are counted here (_on_error).
        self._producer = on_thread_at(priority, lambda: EventPublisher(
            bootstrap,
            topic,
            client_id="recstack-chaos",
            linger_ms=5,
            request_timeout_ms=15_000,
            delivery_timeout_ms=300_000,  # a broker restart is waited out, not turned into a loss
            max_block_ms=120_000,
        ))  # fmt: skip
        self.stats = TrafficStats()
        self._lock = threading.Lock()
        self._acked: list[Acked] = []
        self._malformed: set[tuple[int, int]] = set()
        self._last: dict[int, int] = {}
        self._seq = 0
        self._active = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos-events", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------- control

    def start(self) -> None:
        self._active.set()

    def pause(self, timeout_s: float = 300.0) -> None:
        """Stop sending and wait until the broker acknowledged (or refused) everything sent."""
        self._active.clear()
        time.sleep(0.05)  # let the loop notice before flushing
        try:
            self._producer.flush(timeout_s=timeout_s)
        except PublishError:
            pass  # every failed send is already in stats.failures (_on_error)

    def close(self) -> None:
        self._stopping.set()
        self._active.set()
        self._thread.join(timeout=10)
        self._producer.close(timeout_s=30)

    # -------------------------------------------------------------------- what was acknowledged

    def acked(self) -> list[Acked]:
        with self._lock:
            return list(self._acked)

    def malformed(self) -> set[tuple[int, int]]:
        with self._lock:
            return set(self._malformed)

    def last_offsets(self) -> dict[int, int]:
        """Partition -> last offset the broker acknowledged (valid or not)."""
        with self._lock:
            return dict(self._last)

    def distinct_events(self) -> set[str]:
        with self._lock:
            return {a.event.event_id for a in self._acked}

    # -------------------------------------------------------------------- the producer thread

    def _loop(self) -> None:
        set_thread_priority(0, self._priority)
        while not self._stopping.is_set():
            if not self._active.wait(0.2):
                continue
            started, sent = time.monotonic(), 0
            while self._active.is_set() and not self._stopping.is_set():
                ahead = started + sent / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(min(ahead, 0.05))
                    continue
                try:
                    self._send_one()
                except Exception as exc:  # the producer refused (e.g. blocked past max_block_ms)
                    with self._lock:
                        self.stats.failures.append(f"send: {exc!r}")
                sent += 1

    def _send_one(self) -> None:
        rng = self._rng
        self._seq += 1
        user = self.users[int(rng.integers(len(self.users)))]
        item = self.items[int(rng.choice(len(self.items), p=self._item_p))]
        event_type = _TYPES[int(rng.choice(3, p=_TYPE_P))]
        event = Event(
            event_id=f"{self.run_id}-e{self._seq}",
            user_id=user,
            item_id=item,
            event_type=event_type,
            ts_ms=int(time.time() * 1000),
            price=round(float(rng.uniform(1, 50)), 2),
        )
        value = event.to_json_bytes()
        self._send(user.encode(), value, event)
        self.stats.valid += 1
        if rng.random() < self.dup_share:
            self._send(user.encode(), value, event)  # a producer retry: same key, same bytes
            self.stats.duplicates += 1
        if rng.random() < self.bad_share:
            bad = MALFORMED[int(rng.integers(len(MALFORMED)))]
            self._send(user.encode(), bad, None)
            self.stats.malformed += 1
        if self._followup is not None and self._seq % self._followup_every == 0:
            self._send_followup(user)

    def _send_followup(self, user: str) -> None:
        rng = self._rng
        candidates = [self.items[int(k)] for k in rng.choice(len(self.items), 20, replace=False)]
        answer = self._followup(user, candidates)
        if answer is None or not answer[1]:
            return  # the call failed (a server away): no action follows
        request_id, shown = answer
        with_id = self.followup_events % 2 == 0
        self.followup_events += 1
        event = Event(
            event_id=f"{self.run_id}-f{self._seq}",
            user_id=user,
            item_id=shown[min(len(shown) - 1, int(rng.integers(3)))],
            event_type=("add_to_cart", "purchase")[int(rng.integers(2))],
            ts_ms=int(time.time() * 1000),
            price=round(float(rng.uniform(1, 50)), 2),
            request_id=request_id if with_id else None,
        )
        self._send(user.encode(), event.to_json_bytes(), event)
        self.stats.valid += 1

    def _send(self, key: bytes, value: bytes | None, event: Event | None) -> None:
        # A valid event goes through the publisher's contract check; a malformed record is
        # injected on purpose, unchecked.
        if event is None:
            future = self._producer.publish_raw(key, value)
        else:
            future = self._producer.publish(event)
        self.stats.sent += 1
        future.add_callback(self._on_ack, event)
        future.add_errback(self._on_error)

    def _on_ack(self, event: Event | None, meta: Any) -> None:
        with self._lock:
            if event is None:
                self._malformed.add((meta.partition, meta.offset))
            else:
                self._acked.append(Acked(meta.partition, meta.offset, event))
            if meta.offset > self._last.get(meta.partition, -1):
                self._last[meta.partition] = meta.offset

    def _on_error(self, exc: BaseException) -> None:
        with self._lock:
            self.stats.failures.append(repr(exc))


def on_thread_at(priority: str, build: Callable[[], T]) -> T:
    """``build()`` run on a short-lived thread at ``priority``: threads it starts keep it."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            set_thread_priority(0, priority)
            out.append(build())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="chaos-background-build")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]
