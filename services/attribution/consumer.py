"""The attribution consumer: ``rank-impressions`` and ``user-events`` joined per user into per-arm
counters in Redis, each record applied exactly once (docs/EXPERIMENTS.md).

* **Co-partitioning.** Both topics are keyed by ``user_id`` and have as many partitions, so a
  user's impressions and events share a partition number; the group uses Kafka's range assignor,
  which gives partition ``p`` of both topics to the same member. The member owning ``p`` is the
  only writer of those users' impression lists.
* **Event-time order.** Impressions are applied as soon as they are read. An event waits (held,
  in offset order) until the impressions read from its partition reach its ``ts`` plus
  ``--lateness`` (the partition's watermark, stored in Redis with the offsets), or until it has
  waited ``--max-wait`` on the clock: an event read before its impression still finds it.
* **Exactly once, with the stream's fences.** Taking a partition sets fresh owner tokens for its
  two offsets (the stream's ``take_log.lua``); each batch is ONE script (``lua/apply.lua``) that
  checks the tokens and the offsets this consumer expects and then writes the counters, the
  users' impressions and the new offsets together. A refused batch, a Redis error or an offset
  read back behind what this consumer applied (Redis lost writes) makes the partition be taken
  again and read from the stored offsets + 1: what Redis holds is exactly the records up to them.
"""

from __future__ import annotations

import collections
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError

from recstack import redis_url as redis_urls
from recstack.credentials import check_redis_auth, redact_url
from recstack.errors import UserError
from recstack.events import Event, InvalidEvent, parse_events
from services.attribution import keys
from services.attribution.config import AttributionConfig
from services.attribution.metrics import AttributionMetrics
from services.attribution.rule import (
    Credit,
    Impression,
    InvalidImpression,
    attribute,
    event_credits,
    impression_credits,
    parse_impression,
)
from services.stream.fence import TAKE_PARTITIONS
from services.stream.kafka_side import JoinWatch, RebalanceListener, group_member_options
from services.stream.state import Stopping, retry_redis

log = logging.getLogger(__name__)
_APPLY = (Path(__file__).with_name("lua") / "apply.lua").read_text()
_FENCE_CHECK_S = 5.0  # offsets read back this often to catch writes Redis lost


@dataclass(slots=True)
class Part:
    """One owned partition number (of both topics)."""

    token: str
    imp_applied: int  # last impression offset whose effects are in Redis (-1: none)
    ev_applied: int
    watermark: int  # largest impression ts applied (ms; -1: none)
    imps: list[Impression] = field(default_factory=list)  # read, not yet applied
    imp_read: int = -1  # last impression offset read
    held: collections.deque = field(default_factory=collections.deque)  # (offset, Event | None, read at)
    paused: bool = False


@dataclass(slots=True)
class Batch:
    """What one script call writes for one partition."""

    p: int
    imps: list[Impression]
    imp_to: int
    events: list[tuple[int, Event | None]]
    watermark: int
    credits: list[Credit] = field(default_factory=list)
    unattributed: collections.Counter = field(default_factory=collections.Counter)


class AttributionConsumer:
    """Runs until :meth:`stop`; see the module docstring."""

    def __init__(self, config: AttributionConfig, metrics: AttributionMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or AttributionMetrics()
        self._stop = threading.Event()
        self._redis = redis_urls.connect(config.redis, socket_timeout=10, socket_connect_timeout=5)
        self._take = self._redis.register_script(TAKE_PARTITIONS)
        self._apply = self._redis.register_script(_APPLY)
        self._consumer: KafkaConsumer | None = None
        self._parts: dict[int, Part] = {}
        self._unpositioned: set[int] = set()
        self._fences_checked = time.monotonic()
        self._join = JoinWatch()

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------------------ loop

    def run(self) -> None:
        cfg = self.config
        self._connect()
        log.info(
            "attributing %s to %s as group %s (redis %s)",
            cfg.events_topic,
            cfg.impressions_topic,
            cfg.group,
            redact_url(cfg.redis),
        )
        try:
            while not self._stop.is_set():
                self._poll_once()
        except Stopping:
            log.info("stopping; records not applied are read again by the next owner")
        finally:
            if self._consumer is not None:
                self._consumer.close(autocommit=False)
            self._redis.close()

    def _poll_once(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            polled = consumer.poll(timeout_ms=self.config.poll_timeout_ms, max_records=self.config.max_batch)
        except KafkaError as exc:
            log.warning("poll failed (%s); retrying", exc)
            self._stop.wait(1.0)
            return
        if self._join.after_poll(consumer, self.config.group, bool(polled)):
            held = {tp for p in self._parts for tp in self._tps(p)}
            if held:  # as if lost: whichever member gets them next re-reads from Redis's offsets
                self._on_revoked(held, lost=True)
            consumer.close(autocommit=False)
            self._consumer = None
            self._connect()
            return
        self._position()
        self._take_records(polled)
        for p in sorted(self._parts):
            part = self._parts.get(p)
            if part is None:
                continue
            batch = self._plan(p, part)
            if batch is not None:
                self._write(batch)
        self._check_fences()
        self._flow_control()

    def _connect(self) -> None:
        cfg = self.config
        self._consumer = KafkaConsumer(
            **group_member_options(cfg),
            # Partition p of both topics to one member: its users' impressions and events meet there.
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        counts = {
            t: self._consumer.partitions_for_topic(t) for t in (cfg.impressions_topic, cfg.events_topic)
        }
        for topic, parts in counts.items():
            if not parts:
                self._consumer.close(autocommit=False)
                raise UserError(f"Kafka topic {topic!r} does not exist (infra/up.sh creates it)")
        if len(counts[cfg.impressions_topic]) != len(counts[cfg.events_topic]):
            self._consumer.close(autocommit=False)
            raise UserError(
                f"{cfg.impressions_topic} has {len(counts[cfg.impressions_topic])} partitions and "
                f"{cfg.events_topic} {len(counts[cfg.events_topic])}: they must have as many (both "
                "keyed by user_id) so that a user's impressions and events meet in one consumer"
            )
        self._consumer.subscribe([cfg.impressions_topic, cfg.events_topic], listener=RebalanceListener(self))
        self._join.joining()

    # ------------------------------------------------------------------------------ partitions

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        # On kafka-python's IO thread: pause, and position on the main thread after poll returns.
        fresh = {tp.partition for tp in assigned} - self._parts.keys()
        if fresh and self._consumer is not None:
            self._consumer.pause(*(tp for tp in assigned if tp.partition in fresh))
            self._unpositioned |= fresh
        log.info("assigned partitions %s", sorted({tp.partition for tp in assigned}))

    def _on_revoked(self, revoked: set[TopicPartition], lost: bool = False) -> None:
        gone = {tp.partition for tp in revoked}
        log.info("%s partitions %s", "lost" if lost else "revoked", sorted(gone))
        for p in gone:
            self._parts.pop(p, None)  # held events are read again by the next owner
            self._unpositioned.discard(p)

    def _tps(self, p: int) -> tuple[TopicPartition, TopicPartition]:
        return TopicPartition(self.config.impressions_topic, p), TopicPartition(self.config.events_topic, p)

    def _position(self) -> None:
        """Take newly assigned partitions and seek both topics after their offsets in Redis."""
        if not self._unpositioned:
            return
        assigned = self._consumer.assignment() if self._consumer is not None else set()
        for p in sorted(self._unpositioned):
            if all(tp in assigned for tp in self._tps(p)):
                self._retake(p)
            else:
                log.warning("partition %d assigned in one topic only; waiting for the next rebalance", p)
        self._unpositioned.clear()

    def _retake(self, p: int) -> None:
        """Take ``p`` (fresh owner tokens: a stale owner's batches are refused from now on) and read
        both topics again right after the offsets stored in Redis."""
        consumer = self._consumer
        assert consumer is not None
        token = uuid.uuid4().hex
        fields = [keys.impressions_field(p), keys.events_field(p)]
        imp, ev = self._retrying(lambda: self._take(keys=[keys.OFFSETS, keys.OWNERS], args=[token, *fields]))
        wm = self._retrying(lambda: self._redis.hget(keys.OFFSETS, keys.watermark_field(p)))
        part = Part(token, int(imp or -1), int(ev or -1), int(wm or -1))
        part.imp_read = part.imp_applied
        self._parts[p] = part
        for tp, applied in zip(self._tps(p), (part.imp_applied, part.ev_applied), strict=True):
            if applied >= 0:
                consumer.seek(tp, applied + 1)
            else:
                consumer.seek_to_beginning(tp)
        consumer.resume(*self._tps(p))
        log.info(
            "partition %d: impressions from %d, events from %d", p, part.imp_applied + 1, part.ev_applied + 1
        )

    def _retrying(self, call):
        def failed() -> None:
            self.metrics.redis_retries.inc()

        return retry_redis(call, self._stop, failed)

    # ------------------------------------------------------------------------------ records

    def _take_records(self, polled: dict[TopicPartition, list[Any]]) -> None:
        now = time.monotonic()
        for tp, records in polled.items():
            part = self._parts.get(tp.partition)
            if part is None or tp.partition in self._unpositioned:
                continue  # not ours (yet): read again once positioned
            if tp.topic == self.config.impressions_topic:
                for rec in records:
                    if rec.offset <= part.imp_read:
                        continue
                    part.imp_read = rec.offset
                    try:
                        part.imps.append(parse_impression(rec.value, rec.offset))
                    except InvalidImpression as exc:
                        self.metrics.invalid.labels(tp.topic).inc()
                        log.debug("impression at %d/%d skipped: %s", tp.partition, rec.offset, exc)
            else:
                last = part.held[-1][0] if part.held else part.ev_applied
                fresh = [rec for rec in records if rec.offset > last]
                for rec, event in zip(fresh, parse_events([rec.value for rec in fresh]), strict=True):
                    if isinstance(event, InvalidEvent):
                        self.metrics.invalid.labels(tp.topic).inc()
                        event = None  # its offset still moves past it
                    part.held.append((rec.offset, event, now))

    def _plan(self, p: int, part: Part) -> Batch | None:
        """This partition's impressions read, and the held events now released (in offset order)."""
        cfg = self.config
        watermark = max([part.watermark, *(imp.ts_ms for imp in part.imps)])
        reach = watermark - int(cfg.lateness_s * 1000)
        deadline = time.monotonic() - cfg.max_wait_s
        events: list[tuple[int, Event | None]] = []
        for offset, event, read_at in part.held:
            if event is not None and event.ts_ms > reach:
                if read_at > deadline:
                    break
                self.metrics.released_by_wait.inc()
            events.append((offset, event))
        if not part.imps and not events and part.imp_read == part.imp_applied:
            return None  # (invalid impressions alone still move the offset past them)
        batch = Batch(p, list(part.imps), part.imp_read, events, watermark)
        for imp in batch.imps:
            batch.credits += impression_credits(imp)
        valid = [e for _, e in events if e is not None]
        if valid:
            stored = self._user_impressions({e.user_id for e in valid})
            for event in valid:
                pending = [imp for imp in batch.imps if imp.user_id == event.user_id]
                imp = attribute(event, [*stored.get(event.user_id, ()), *pending], cfg.window_ms)
                if imp is not None:
                    batch.credits += event_credits(event, imp)
                else:
                    batch.unattributed["unknown_request_id" if event.request_id else "no_impression"] += 1
        return batch

    def _user_impressions(self, users: set[str]) -> dict[str, list[Impression]]:
        ordered = sorted(users)

        def read() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for user in ordered:
                pipe.lrange(keys.user_key(user), 0, -1)
            return pipe.execute()

        replies = self._retrying(read)
        return {
            u: [Impression.from_state(u, raw) for raw in r] for u, r in zip(ordered, replies, strict=True)
        }

    # ------------------------------------------------------------------------------ writes

    def _write(self, batch: Batch) -> None:
        cfg = self.config
        part = self._parts[batch.p]
        ev_to = batch.events[-1][0] if batch.events else part.ev_applied
        args: list[Any] = [2]
        args += [keys.impressions_field(batch.p), part.token, part.imp_applied, batch.imp_to]
        args += [keys.events_field(batch.p), part.token, part.ev_applied, ev_to]
        args += [1, keys.watermark_field(batch.p), batch.watermark]
        sums: dict[tuple[str, str], int] = collections.Counter()
        arms: set[str] = set()
        for exp, arm, minute, name, amount in batch.credits:
            sums[(keys.totals_key(exp, arm), name)] += amount
            sums[(keys.buckets_key(exp, arm), f"{minute}:{name}")] += amount
            arms.add(json.dumps([exp, arm]))
        args.append(len(sums))
        for (key, name), amount in sums.items():
            args += [key, name, amount]
        ttl_ms = int(cfg.state_ttl_s * 1000)
        args.append(len(batch.imps))
        for imp in batch.imps:  # oldest first: the newest ends at the head of the list
            args += [keys.user_key(imp.user_id), imp.to_state(), cfg.max_per_user, ttl_ms]
        args += [keys.ARMS, *sorted(arms)]
        try:
            reply = self._apply(keys=[keys.OFFSETS, keys.OWNERS], args=args)
        except (redis.RedisError, OSError) as exc:
            # Applied or not, we cannot tell: Redis tells, once it answers again.
            self.metrics.redis_retries.inc()
            log.warning(
                "partition %d: batch write failed (%s); reading from the stored offsets", batch.p, exc
            )
            self._stop.wait(0.5)
            self._rewind(batch.p)
            return
        if reply[0] != b"ok":
            self._refused(batch.p, reply)
            return
        part.imp_applied, part.ev_applied, part.watermark = batch.imp_to, ev_to, batch.watermark
        del part.imps[: len(batch.imps)]
        for _ in batch.events:
            part.held.popleft()
        self.metrics.count(batch.credits)
        for reason, n in batch.unattributed.items():
            self.metrics.unattributed.labels(reason).inc(n)

    def _refused(self, p: int, reply: list[bytes]) -> None:
        owner = reply[3].decode()
        if owner and owner != self._parts[p].token:
            # Another member took it (this one was away past the session timeout): leave it.
            log.warning("partition %d: owned by another consumer now; leaving it", p)
            self._parts.pop(p, None)
            if self._consumer is not None:
                self._consumer.pause(*self._tps(p))
            return
        log.warning(
            "partition %d: Redis holds %s=%s, not what this consumer applied (Redis lost writes?)",
            p,
            reply[1].decode(),
            reply[2].decode() or "nothing",
        )
        self._rewind(p)

    def _rewind(self, p: int) -> None:
        self.metrics.fence_rewinds.inc()
        self._parts.pop(p, None)
        self._retake(p)

    def _check_fences(self) -> None:
        """Read the offsets back now and then: behind what this consumer applied means Redis lost
        acknowledged writes (counters with them); read those partitions again from there."""
        if time.monotonic() - self._fences_checked < _FENCE_CHECK_S or not self._parts:
            return
        self._fences_checked = time.monotonic()
        owned = sorted(self._parts)
        names = [f(p) for p in owned for f in (keys.impressions_field, keys.events_field)]
        stored = self._retrying(lambda: self._redis.hmget(keys.OFFSETS, names))
        for i, p in enumerate(owned):
            part = self._parts[p]
            imp, ev = (int(v) if v is not None else -1 for v in stored[2 * i : 2 * i + 2])
            if imp < part.imp_applied or ev < part.ev_applied:
                log.warning("partition %d: offsets in Redis went back (%d, %d); reading again", p, imp, ev)
                self._rewind(p)

    def _flow_control(self) -> None:
        """Pause a partition's events while too many are held; resume once under the limit."""
        held = 0
        for p, part in self._parts.items():
            held += len(part.held)
            over = len(part.held) >= self.config.max_held
            if over != part.paused and self._consumer is not None:
                tp = self._tps(p)[1]
                (self._consumer.pause if over else self._consumer.resume)(tp)
                part.paused = over
        self.metrics.held.set(held)


def run(config: AttributionConfig) -> int:
    """Run a consumer in this process until SIGTERM/SIGINT; exit code 0 after a clean stop."""
    check_redis_auth(config.redis)
    metrics = AttributionMetrics()
    if config.metrics_port:
        metrics.serve(config.metrics_port, config.metrics_host)
    consumer = AttributionConsumer(config, metrics)

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        consumer.stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    consumer.run()
    return 0
