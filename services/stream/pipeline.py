"""The stream consumer's apply pipeline: a polled batch parsed and validated, malformed records sent
to the dead-letter topic, the rest planned against the fences and the dedup keys, aggregated and
written in one script (:class:`feature_store.writes.FeatureWriter`, on the writer thread), retried
until applied, then booked: positions moved, events handed to the event log, metrics counted.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from kafka import TopicPartition
from kafka.errors import KafkaError
from redis.exceptions import RedisClusterException

from feature_store.cluster import ClusterFeatureWriter
from feature_store.writes import ApplyResult, BatchGuard
from recstack.events import Event, InvalidEvent, parse_events, refuse_future_events
from services.stream import deadletter
from services.stream.aggregate import aggregate
from services.stream.config import StreamConfig
from services.stream.fence import EventLogFence
from services.stream.keys import seen_key
from services.stream.metrics import StreamMetrics
from services.stream.state import BACKOFF_MAX_S, BACKOFF_START_S, Stopping, log


@dataclass(slots=True)
class Plan:
    """One attempt at applying a batch: which records do what."""

    apply: list[int] = field(default_factory=list)  # indexes of events to apply
    dead: list[int] = field(default_factory=list)  # indexes of malformed records past the fence
    duplicates: int = 0
    fenced: list[int] = field(default_factory=list)  # valid records at or below the fence, not yet logged
    replayed: int = 0
    last_offsets: dict[int, int] = field(default_factory=dict)  # partition -> last offset past the fence


# RedisClusterException: redis-py's cluster client when no node answers (not a RedisError)
_RETRYABLE = (redis.RedisError, RedisClusterException, KafkaError, OSError)


@dataclass(slots=True)
class Batch:
    """One polled batch on its way to Redis, across attempts."""

    records: list[Any]
    parsed: list[Event | InvalidEvent]
    started: float
    polled: dict[int, int]  # partition -> last offset polled
    plan: Plan = field(default_factory=Plan)
    to_log: list[Event] = field(default_factory=list)
    to_log_partitions: list[int] = field(default_factory=list)
    dlq_sent: set[int] = field(default_factory=set)
    known_duplicates: set[int] = field(default_factory=set)
    # Redis Cluster: (slot, partition) -> offset whose effects that slot already holds
    floors: dict[tuple[int, int], int] = field(default_factory=dict)
    attempt: int = 0
    future: Future | None = None  # the first attempt's script, running on the writer thread
    outcome: ApplyResult | BaseException | None = None  # the first attempt's, when not in a future

    @classmethod
    def parse(cls, polled: dict[TopicPartition, list[Any]], max_future_skew_s: float) -> Batch:
        started = time.perf_counter()
        records = [rec for recs in polled.values() for rec in recs]
        last = {tp.partition: recs[-1].offset for tp, recs in polled.items()}
        parsed = parse_events([rec.value for rec in records])
        # Events stamped too far ahead of our clock would freeze trending and recency: dead letters.
        refuse_future_events(parsed, int(time.time() * 1000), int(max_future_skew_s * 1000))
        return cls(records, parsed, started, last)

    def cut(self, limits: dict[int, int]) -> None:
        """Leave out the records of these partitions from these offsets on (held partitions: read
        again later); the batch then stops each partition's position before the first one left out."""
        keep = [
            i for i, rec in enumerate(self.records) if rec.offset < limits.get(rec.partition, rec.offset + 1)
        ]
        if len(keep) == len(self.records):
            return
        index = {old: new for new, old in enumerate(keep)}
        self.records = [self.records[i] for i in keep]
        self.parsed = [self.parsed[i] for i in keep]
        self.dlq_sent = {index[i] for i in self.dlq_sent if i in index}
        self.known_duplicates = {index[i] for i in self.known_duplicates if i in index}
        for p, offset in limits.items():
            if p in self.polled:
                self.polled[p] = min(self.polled[p], offset - 1)

    def first_outcome(self) -> ApplyResult | BaseException | None:
        if self.future is None:
            return self.outcome
        try:
            return self.future.result()
        except _RETRYABLE as exc:
            return exc


class ApplyPipeline(EventLogFence):
    """Batches from poll to booked (see the module docstring); writes go through the fences."""

    def __init__(self, config: StreamConfig, metrics: StreamMetrics | None = None) -> None:
        super().__init__(config, metrics)
        self._half_life_ms = config.trending_half_life_s * 1000.0
        # One Redis write in flight at a time, on this thread, while the main thread polls and
        # parses the next batch (redis-py waits for the reply without holding the GIL).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-writer")
        self._inflight: Batch | None = None

    def _begin(self, batch: Batch) -> Batch:
        """First attempt: dead letters, reads and aggregation here; the script runs on the writer thread."""
        try:
            job = self._prepare(batch)
        except _RETRYABLE as exc:
            batch.outcome = exc
            return batch
        if job is None:
            batch.outcome = None
        else:
            batch.future = self._executor.submit(self._writer.apply, *job)
        return batch

    def _attempt(self, batch: Batch) -> ApplyResult | BaseException | None:
        """One synchronous attempt; an exception worth retrying is returned, not raised."""
        try:
            job = self._prepare(batch)
            return None if job is None else self._writer.apply(*job)
        except _RETRYABLE as exc:
            return exc

    def _finish_inflight(self) -> None:
        """Wait for the batch in flight; redo it until it is applied; then account for it."""
        batch = self._inflight
        if batch is None:
            return
        outcome = batch.first_outcome()
        while True:
            if isinstance(outcome, BaseException):
                batch.attempt += 1
                self._fences_suspect = True  # Redis may come back with writes lost: check once it answers
                self.metrics.redis_retries.inc()
                delay = min(BACKOFF_START_S * 2 ** min(batch.attempt, 10), BACKOFF_MAX_S)
                log.warning(
                    "batch write failed (%s: %s); retry %d in %.1fs",
                    type(outcome).__name__,
                    outcome,
                    batch.attempt,
                    delay,
                )
                if self._stop.wait(delay):
                    self._inflight = None
                    raise Stopping from outcome
            elif outcome is None or outcome.ok:
                break
            elif self._resolve(batch, outcome):
                # Redis lost writes: the batch cannot go on top of what it now holds. Give it up
                # unbooked; _check_fences reads the lost range again, then this batch's records.
                self._inflight = None
                self._abandoned.append(batch)
                return
            outcome = self._attempt(batch)
        self._inflight = None
        self._book(batch)

    def _resolve(self, batch: Batch, result: ApplyResult) -> bool:
        """Learn from a refused write before the next attempt; True when a partition's stored
        fence is behind what this consumer applied (Redis lost writes): the batch is given up."""
        plan = batch.plan
        lost = dict(result.behind)  # Redis Cluster: slot fences below what this writer stored there
        p = result.fenced_partition
        if (
            p is not None
            and result.stored_offset is not None
            and result.stored_offset < self._applied.get(p, -1)
        ):
            lost[p] = min(lost.get(p, result.stored_offset), result.stored_offset)
        if lost:
            for p, offset in lost.items():
                self._behind[p] = min(self._behind.get(p, offset), offset)
            return True
        for key, offset in result.floors.items():  # Redis Cluster: slots holding part of the batch
            if offset > batch.floors.get(key, -1):
                batch.floors[key] = offset
        if result.fenced_partition is not None:
            # Another writer moved the partition (or our last write went through unacknowledged):
            # reread the fence and plan again. Records now at or below it are not applied.
            self.metrics.fence_conflicts.inc()
            parts = sorted(plan.last_offsets)
            applied, logged = self._with_retries(lambda: self._read_offsets(parts))
            self._applied.update(applied)
            self._logged.update(logged)
        elif result.seen_duplicates:  # applied meanwhile through another partition
            batch.known_duplicates.update(plan.apply[i] for i in result.seen_duplicates)
        else:  # written by someone else since the read: the next attempt reads them again
            self.metrics.stale_users.inc(len(result.stale_users))
        return False

    def _book(self, batch: Batch) -> None:
        """An applied batch: move the fence and positions, log its events, count it."""
        records, parsed, plan = batch.records, batch.parsed, batch.plan
        now = time.time()
        applied_events: list[Event] = [parsed[i] for i in plan.apply]  # type: ignore[misc]
        for p, offset in plan.last_offsets.items():
            self._applied[p] = offset
        position = self._position
        for p, offset in batch.polled.items():
            if offset >= position.get(p, -1):
                position[p] = offset + 1
        if self._event_log is not None:
            to_log = plan.apply
            if self._no_relog:  # read again after Redis lost writes: some are in the log already
                to_log = self._not_yet_logged(records, to_log)
            self._event_log.append(
                [parsed[i] for i in to_log] if to_log is not plan.apply else applied_events,  # type: ignore[misc]
                [records[i].partition for i in to_log],
            )
            self._event_log.append(batch.to_log, batch.to_log_partitions)
            self.metrics.logged.inc(len(to_log) + len(batch.to_log))
        elif plan.last_offsets:
            self._commit(dict(self._position), sync=False)
        m = self.metrics
        m.consumed.inc(len(records))
        m.applied.inc(len(applied_events))
        m.duplicate.inc(plan.duplicates)
        m.dead_lettered.inc(len(plan.dead))
        m.replayed.inc(plan.replayed)
        m.batch_size.observe(len(records))
        m.batch_seconds.observe(time.perf_counter() - batch.started)
        m.freshness.observe_many([max(0.0, now - records[i].timestamp / 1000.0) for i in plan.apply])

    def _plan(
        self, records: list[Any], parsed: list[Event | InvalidEvent], known_duplicates: set[int]
    ) -> Plan:
        plan = Plan()
        applied = self._applied
        logged = self._logged
        seen_ids: set[str] = set()
        for i, rec in enumerate(records):
            p = rec.partition
            ev = parsed[i]
            if rec.offset <= applied.get(p, -1):  # behind the fence: already applied
                plan.replayed += 1
                if type(ev) is Event and rec.offset > logged.get(p, -1):
                    plan.fenced.append(i)
                continue
            plan.last_offsets[p] = rec.offset
            if type(ev) is not Event:
                plan.dead.append(i)
            elif i in known_duplicates or ev.event_id in seen_ids:
                plan.duplicates += 1
            else:
                seen_ids.add(ev.event_id)
                plan.apply.append(i)
        return plan

    def _prepare(self, batch: Batch) -> tuple | None:
        """Plan an attempt, send dead letters, read what the write depends on, drop event ids
        already applied, aggregate. Returns the arguments of ``FeatureWriter.apply`` (None:
        nothing to apply) and leaves the fenced events to log in ``batch.to_log``."""
        plan = self._dead_letter(batch)
        records, parsed = batch.records, batch.parsed
        topic = self.config.topic
        events: list[Event] = [parsed[i] for i in plan.apply]  # type: ignore[misc]
        fenced = plan.fenced if self._event_log is not None else []
        keys = [seen_key(ev.event_id) for ev in events]
        keys += [seen_key(parsed[i].event_id) for i in fenced]  # type: ignore[union-attr]
        claims = (
            [f"{topic}:{records[i].partition}:{records[i].offset}".encode() for i in plan.apply]
            if self._cluster
            else []  # one server: the batch's script sets the dedup keys with its writes
        )
        state = self._writer.read(
            list(dict.fromkeys(ev.user_id for ev in events)),
            keys,
            claims=claims,
            claim_ttl_s=self.config.dedup_window_s,
        )
        n = len(events)
        # Behind the fence, log a record again only if it applied itself (not a duplicate of
        # another); no key at all means it aged out of the dedup window: log rather than lose it.
        batch.to_log = []
        batch.to_log_partitions = []
        for i, owner in zip(fenced, state.seen[n:], strict=True):
            rec = records[i]
            if owner is None or owner == f"{topic}:{rec.partition}:{rec.offset}".encode():
                batch.to_log.append(cast(Event, parsed[i]))
                batch.to_log_partitions.append(rec.partition)
        if any(owner is not None for owner in state.seen[:n]):  # ids applied by earlier records
            keep = [j for j in range(n) if state.seen[j] is None]
            plan.duplicates += n - len(keep)
            plan.apply = [plan.apply[j] for j in keep]
            events = [events[j] for j in keep]
            keys = [keys[j] for j in keep]
        else:
            del keys[n:]
        if not plan.last_offsets:
            return None
        slot_partitions: dict[int, set[int]] = {}
        if self._cluster:
            users, items, slot_partitions = self._cluster_deltas(batch)
        else:
            users, items = aggregate(events, self._half_life_ms)
        guard = BatchGuard(
            offsets_key=self._applied_key,
            expected={p: self._applied.get(p, -1) for p in plan.last_offsets},
            applied=dict(plan.last_offsets),
            seen_keys=keys,
            seen_values=[f"{topic}:{records[i].partition}:{records[i].offset}".encode() for i in plan.apply],
            seen_ttl_s=self.config.dedup_window_s,
            slot_partitions=slot_partitions,
            floors=batch.floors,
        )
        return users, items, guard, state

    def _cluster_deltas(self, batch: Batch) -> tuple[dict, dict, dict[int, set[int]]]:
        """Redis Cluster: the batch's deltas without the parts that slots already hold (their
        floors, learned from refused or partly applied attempts), and which partitions write each slot."""
        writer = cast(ClusterFeatureWriter, self._writer)
        floors, records, parsed = batch.floors, batch.records, batch.parsed
        slot_partitions: dict[int, set[int]] = {}
        user_events: list[Event] = []
        item_events: list[Event] = []
        for i in batch.plan.apply:
            ev = cast(Event, parsed[i])
            p, offset = records[i].partition, records[i].offset
            slot = writer.user_slot(ev.user_id)
            if not floors or offset > floors.get((slot, p), -1):
                user_events.append(ev)
                slot_partitions.setdefault(slot, set()).add(p)
            slot = writer.item_slot(ev.item_id)
            if not floors or offset > floors.get((slot, p), -1):
                item_events.append(ev)
                slot_partitions.setdefault(slot, set()).add(p)
        if not floors:
            users, items = aggregate(user_events, self._half_life_ms)
        else:
            users = aggregate(user_events, self._half_life_ms)[0]
            items = aggregate(item_events, self._half_life_ms)[1]
        return users, items, slot_partitions

    def _dead_letter(self, batch: Batch) -> Plan:
        """Plan the batch and send its malformed records to the DLQ, acknowledged (once per
        record). A partition whose dead letter cannot be sent is held at that record: the batch
        goes on without it and what follows (see :mod:`services.stream.deadletter`)."""
        waiting = self._holds.limits()
        if waiting:  # polled before its partition was held
            batch.cut(waiting)
        plan = batch.plan = self._plan(batch.records, batch.parsed, batch.known_duplicates)
        todo = [i for i in plan.dead if i not in batch.dlq_sent]
        if not todo:
            return plan
        assert self._dead_letters is not None and self._consumer is not None
        records, parsed = batch.records, batch.parsed
        letters = [
            deadletter.Letter(
                records[i].partition, records[i].offset, records[i].key, records[i].value, str(parsed[i])
            )
            for i in todo
        ]
        held = self._dead_letters.send(letters)
        for i in todo:
            hold = held.get(records[i].partition)
            if hold is None or records[i].offset < hold[0]:
                batch.dlq_sent.add(i)
        if not held:
            return plan
        for p, (offset, reason) in held.items():
            self._holds.hold(self._consumer, p, offset, reason)
        batch.cut({p: offset for p, (offset, _) in held.items()})
        plan = batch.plan = self._plan(batch.records, batch.parsed, batch.known_duplicates)
        return plan
