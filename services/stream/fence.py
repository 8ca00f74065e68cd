"""The stream consumer's fences: the event log's ownership (partition tokens, rolls recorded in
Redis only while every partition in them is still ours) and the read-back of the applied fences
that catches writes Redis lost, seeking those partitions back to read them again.

How the two fit the exactly-once argument is in :mod:`services.stream.consumer` and
``docs/FEATURES.md``; the Parquet files themselves are written by :mod:`services.stream.eventlog`.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import redis
from kafka import TopicPartition
from redis.exceptions import RedisClusterException

from feature_store.cluster import ClusterFeatureWriter
from services.stream.config import StreamConfig
from services.stream.eventlog import Staged, partitions_of, without_partitions
from services.stream.keys import log_owners_key, log_rolls_key, logged_key
from services.stream.metrics import StreamMetrics
from services.stream.state import ConsumerState, Stopping, log

if TYPE_CHECKING:
    from services.stream.pipeline import Batch

_ROLL_RETRY_S = 5.0  # a failed roll is tried again this soon (or after --log-roll-s, if shorter)
# How often the partitions' applied offsets are read back from Redis to catch writes Redis lost
# (a restart from an old AOF or RDB file, a failover to a lagging replica) even when no batch
# follows to be refused: one HMGET of a few fields, negligible next to the batches' scripts.
_FENCE_CHECK_S = 5.0
# On a Redis Cluster a node other than the one holding the partitions' applied offsets may lose
# writes: its slot fences are read back (one pipelined HMGET per slot written, each node in
# parallel) after every Redis error and this often, when reading thousands of keys costs little.
_SLOT_FENCE_CHECK_S = 30.0

# The event log's scripts (KEYS and ARGV are described in each file), read once at import. Taking
# partitions (a fresh owner token per field, the offsets as they then stand) is shared with the
# attribution consumer (services.attribution.consumer), whose batches check the same tokens.
_LUA = Path(__file__).with_name("lua")
TAKE_PARTITIONS = (_LUA / "take_log.lua").read_text()
_COMMIT_ROLL = (_LUA / "commit_roll.lua").read_text()
_RETAKE_LOG = (_LUA / "retake_log.lua").read_text()


@dataclass(slots=True)
class Roll:
    """Event-log files being staged, the offsets they make durable once recorded, and the owner
    tokens under which they may be recorded."""

    future: Future  # EventLog.stage -> list[Staged]
    columns: list[list]  # the events, as the event log's columns
    marks: dict[int, int]  # partition -> last offset whose events are in these files (or earlier ones)
    tokens: dict[int, str]  # partition -> owner token, for every partition in marks or in columns


class EventLogFence(ConsumerState):
    """The event log's ownership and rolls, and the lost-writes check (see the module docstring)."""

    def __init__(self, config: StreamConfig, metrics: StreamMetrics | None = None) -> None:
        super().__init__(config, metrics)
        self._take_log = self._redis.register_script(TAKE_PARTITIONS)
        self._commit_roll = self._redis.register_script(_COMMIT_ROLL)
        self._retake_log = self._redis.register_script(_RETAKE_LOG)
        self._logged_key = logged_key(config.topic)
        self._log_keys = [self._logged_key, log_owners_key(config.topic)]
        self._rolls_key = log_rolls_key(config.topic)
        # Event-log files are written on their own thread: a roll of 30 s of events takes a while.
        self._log_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-eventlog")
        self._rolling: Roll | None = None
        self._tokens: dict[int, str] = {}  # partition -> our owner token for the event log
        # Rolls whose record in Redis failed without an answer (on the IO thread): settled on the main thread.
        self._uncertain: list[tuple[Roll, list[Staged]]] = []
        self._unpublished: list[Staged] = []  # recorded in Redis, rename failed: tried again
        self._log_failing = False  # the last roll failed to write
        # Lost writes (see _check_fences): when the fences were last read back, batches given up
        # because their fence had gone back, and partition -> offset up to which re-applied
        # records are already logged.
        self._fences_checked = self._slot_fences_checked = time.monotonic()
        self._abandoned: list[Batch] = []
        self._behind: dict[int, int] = {}  # partition -> a stored fence found behind by a batch
        self._no_relog: dict[int, int] = {}

    # ------------------------------------------------------------------------------ partitions

    def _take_partitions(self, partitions: list[int]) -> tuple[dict[int, int], dict[int, int]]:
        """Become the partitions' event-log owner (a fresh token: rolls of any earlier owner are
        refused from now on) and read their applied and logged offsets."""
        token = uuid.uuid4().hex
        logged_raw = self._take_log(keys=self._log_keys, args=[token, *partitions])
        applied_raw = self._redis.hmget(self._applied_key, partitions)
        for p in partitions:
            self._tokens[p] = token
        applied = {p: int(v) if v is not None else -1 for p, v in zip(partitions, applied_raw, strict=True)}
        logged = {p: int(v) if v is not None else -1 for p, v in zip(partitions, logged_raw, strict=True)}
        return applied, logged

    def _read_offsets(self, partitions: list[int]) -> tuple[dict[int, int], dict[int, int]]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(self._applied_key, partitions)
        pipe.hmget(self._logged_key, partitions)
        applied_raw, logged_raw = pipe.execute()
        applied = {p: int(v) if v is not None else -1 for p, v in zip(partitions, applied_raw, strict=True)}
        logged = {p: int(v) if v is not None else -1 for p, v in zip(partitions, logged_raw, strict=True)}
        return applied, logged

    # ------------------------------------------------------------------------------ lost writes

    def _check_fences(self, started: Batch | None) -> Batch | None:
        """Catch writes Redis acknowledged and then lost (a restart from an old AOF or RDB file, a
        failover to a lagging replica): its fences, dedup keys and features went back together,
        and what this consumer applied since is gone. Read the fences back every _FENCE_CHECK_S,
        at once after a Redis error (the connection came back: maybe to a Redis with less) and
        after a batch found its fence behind; read every partition whose fence went back again
        from there. Returns ``started`` (the batch polled meanwhile), or None when it is given up
        to be read again after the lost range. Runs on the main thread with no batch in flight."""
        now = time.monotonic()
        if not (self._abandoned or self._fences_suspect or now - self._fences_checked >= _FENCE_CHECK_S):
            return started
        owned = sorted(p for p in self._applied if p in self._position)
        slots = self._cluster and (
            self._fences_suspect or now - self._slot_fences_checked >= _SLOT_FENCE_CHECK_S
        )
        stored = self._with_retries(lambda: self._read_offsets(owned))[0] if owned else {}
        behind = {p: offset for p, offset in stored.items() if offset < self._applied[p]}
        if slots and owned:
            writer = cast(ClusterFeatureWriter, self._writer)
            lost = self._with_retries(lambda: writer.lost_fences(self._applied_key, owned))
            for p, offset in lost.items():
                behind[p] = min(behind.get(p, offset), offset)
            self._slot_fences_checked = time.monotonic()
        for p, offset in self._behind.items():
            if p in self._applied and p in self._position:
                behind[p] = min(behind.get(p, offset), offset)
        self._behind = {}
        self._fences_checked = time.monotonic()
        self._fences_suspect = False
        if not behind and not self._abandoned:
            return started
        # Batches given up, and the one polled meanwhile: their records are read again.
        again: dict[int, int] = {}  # partition -> first offset to read again
        for batch in [*self._abandoned, *([started] if started is not None else [])]:
            for rec in batch.records:
                if rec.offset < again.get(rec.partition, rec.offset + 1):
                    again[rec.partition] = rec.offset
        self._abandoned = []
        reread = self._rewind(behind) if behind else set()
        consumer = self._consumer
        assert consumer is not None
        assigned = consumer.assignment()
        for p, offset in again.items():
            tp = TopicPartition(self.config.topic, p)
            if p not in reread and tp in assigned:
                consumer.seek(tp, offset)
        return None

    def _rewind(self, behind: dict[int, int]) -> set[int]:
        """Partitions whose stored fence is behind what this consumer applied: read them again
        from the stored fence + 1, so the range Redis lost is applied again. With the event log
        on, its offsets are fenced separately: the rolls in progress are settled first, the
        partitions are taken again with the logged offsets this consumer made durable, and
        records at or below those are applied again but not logged twice."""
        consumer = self._consumer
        assert consumer is not None
        owned = sorted(p for p in self._applied if p in self._position)
        expected = {p: self._applied[p] for p in behind}
        reread = set(behind)
        if self._event_log is not None:
            self._finish_roll(main_thread=True, wait=True)
            self._settle_pending()
            # A roll refused meanwhile (Redis lost our owner tokens too) dropped its events of
            # those partitions: read them again as well.
            reread |= {p for p in owned if p not in self._tokens}
            self._event_log.drop_partitions(reread)
            applied, logged = self._with_retries(lambda: self._retake(owned))
        else:
            applied, logged = self._with_retries(lambda: self._read_offsets(owned))
        self._writer.forget()  # the users it remembers may hold writes that were lost
        if self._cluster:
            # A slot's fence may be behind while the partition's applied offset is not: that
            # offset no longer means "applied in every slot", so it goes down to the lowest slot
            # fence (a new owner starts there); reading again from it, the slots holding more skip
            # the rest.
            lower = {p: offset for p, offset in behind.items() if offset < applied[p]}
            writer = cast(ClusterFeatureWriter, self._writer)
            self._with_retries(lambda: writer.lower_applied(self._applied_key, lower))
            applied.update(lower)
        for p in sorted(reread):
            self._applied[p] = applied[p]
            start = applied[p] + 1
            if self._event_log is not None:
                start = min(applied[p], logged[p]) + 1
                if logged[p] > applied[p]:
                    self._no_relog[p] = logged[p]
            consumer.seek(TopicPartition(self.config.topic, p), start)
            self._position[p] = start
            if p in expected:
                lost = expected[p] - applied[p]
                self.metrics.fence_rewinds.inc()
                self.metrics.fence_rewound_records.inc(lost)
                log.warning(
                    "partition %d: Redis holds applied offset %d but this consumer applied up to %d: "
                    "Redis lost %d records' acknowledged writes (restarted from an old AOF or RDB "
                    "file, or failed over to a lagging replica); reading them again from offset %d",
                    p,
                    applied[p],
                    expected[p],
                    lost,
                    start,
                )
            else:
                log.warning(
                    "partition %d: its event-log owner token was lost by Redis; reading it again "
                    "from offset %d",
                    p,
                    start,
                )
        return reread

    def _retake(self, partitions: list[int]) -> tuple[dict[int, int], dict[int, int]]:
        """Take ``partitions`` again for the event log (a fresh token), raising their logged
        offsets back to what this consumer recorded, and read their applied offsets."""
        token = uuid.uuid4().hex
        args: list[Any] = [token]
        for p in partitions:
            args += (p, self._logged.get(p, -1))
        logged_raw = self._retake_log(keys=self._log_keys, args=args)
        applied_raw = self._redis.hmget(self._applied_key, partitions)
        logged = {p: int(v) for p, v in zip(partitions, logged_raw, strict=True)}
        for p in partitions:
            self._tokens[p] = token
            self._logged[p] = logged[p]
        applied = {p: int(v) if v is not None else -1 for p, v in zip(partitions, applied_raw, strict=True)}
        return applied, logged

    def _not_yet_logged(self, records: list[Any], indexes: list[int]) -> list[int]:
        """The applied records not already in the event log: after a rewind, records up to the
        partition's logged offset are applied again but were logged before Redis lost them."""
        no_relog = self._no_relog
        kept = [i for i in indexes if records[i].offset > no_relog.get(records[i].partition, -1)]
        for p, offset in list(no_relog.items()):
            if self._position.get(p, -1) > offset:  # past it (positions move in _book, before this)
                del no_relog[p]
        return kept

    # ------------------------------------------------------------------------------ rolls

    def _roll(self, main_thread: bool) -> None:
        """Roll the whole buffer now and wait for it (before a revocation or the shutdown)."""
        self._finish_roll(main_thread, wait=True)
        self._start_roll()
        self._finish_roll(main_thread, wait=True)

    def _start_roll(self) -> None:
        """Hand the buffer to the log-writer thread; the loop keeps applying batches meanwhile."""
        assert self._event_log is not None
        if self._rolling is not None or self._uncertain:  # rolls are recorded in order
            return
        columns = self._event_log.take()
        owned = self._tokens
        stray = partitions_of(columns) - owned.keys()
        if stray:  # refused before: they belong to another member now, which logs them
            before = len(columns[0])
            columns = without_partitions(columns, stray)
            self.metrics.log_refused.inc(before - len(columns[0]))
        # every event of the partitions' processed records is in ``columns`` (or was logged before)
        logged = self._logged
        marks = {p: at - 1 for p, at in self._position.items() if p in owned and at - 1 > logged.get(p, -1)}
        tokens = {p: owned[p] for p in sorted(set(marks) | partitions_of(columns))}
        future = self._log_executor.submit(self._event_log.stage, columns)
        self._rolling = Roll(future, columns, marks, tokens)

    def _finish_roll(self, main_thread: bool, wait: bool = False) -> None:
        """Once a roll's files are staged, record it in Redis if every partition in it is still
        ours (raising their logged offsets); then publish the files and commit to Kafka."""
        roll = self._rolling
        if roll is None or not (wait or roll.future.done()):
            return
        self._rolling = None
        assert self._event_log is not None
        try:
            staged = roll.future.result()
        except OSError as exc:
            self._event_log.put_back(roll.columns)
            self._event_log.postpone(min(self.config.log_roll_s, _ROLL_RETRY_S))
            self._log_failing = True
            self.metrics.log_write_failures.inc()
            self.metrics.log_unwritten.set(self._unwritten())
            log.error(
                "event log: writing %d events to %s failed (%s); they stay buffered (%d in memory) and "
                "Kafka offsets are not committed until a write succeeds",
                len(roll.columns[0]),
                self._event_log.directory,
                exc,
                self._event_log.rows,
            )
            return
        if not roll.tokens:
            return
        args: list[Any] = [len(roll.tokens)]
        for p, token in roll.tokens.items():
            args += [p, token, roll.marks.get(p, -1)]
        args += [s.name for s in staged]
        keys = [*self._log_keys, self._rolls_key]
        try:
            if main_thread:
                refused = self._with_retries(lambda: self._commit_roll(keys=keys, args=args))
            else:  # on the IO thread: one attempt, do not stall heartbeats
                refused = self._commit_roll(keys=keys, args=args)
        except Stopping:
            self._uncertain.append((roll, staged))
            raise
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            self._uncertain.append((roll, staged))
            log.warning("event log: recording a roll failed (%s); it is settled once Redis answers", exc)
            return
        self._settle_roll(roll, staged, {int(p) for p in refused}, main_thread)

    def _settle_roll(self, roll: Roll, staged: list[Staged], refused: set[int], main_thread: bool) -> None:
        """A roll recorded in Redis (``refused`` empty) is published; a refused one is deleted, the
        events of the partitions that moved are dropped and the others are rolled again."""
        assert self._event_log is not None
        if refused:
            self._event_log.discard(staged)
            for p in refused:
                self._tokens.pop(p, None)
            kept = without_partitions(roll.columns, refused)
            self._event_log.put_back(kept)
            dropped = len(roll.columns[0]) - len(kept[0]) + self._event_log.drop_partitions(refused)
            self._event_log.postpone(0.0)
            self.metrics.log_refused.inc(dropped)
            log.warning(
                "event log: partitions %s moved to another consumer before this roll was recorded; "
                "its files are deleted and their %d unlogged events left to the new owner",
                sorted(refused),
                dropped,
            )
            return
        self._log_failing = False
        try:
            files = self._event_log.publish(staged)
        except OSError as exc:  # recorded in Redis: the files must be published, later
            self._unpublished.extend(staged)
            log.error("event log: renaming a recorded roll into place failed (%s); trying again", exc)
        else:
            if files:
                log.info("event log: %d events -> %d file(s)", len(roll.columns[0]), len(files))
            self._forget_rolls([s.name for s in staged])
        self.metrics.log_unwritten.set(0)
        marks = {p: o for p, o in roll.marks.items() if self._tokens.get(p) == roll.tokens[p]}
        self._logged.update(marks)
        if self._consumer is not None and marks:
            self._commit({p: offset + 1 for p, offset in marks.items()}, sync=main_thread)

    def _settle_pending(self) -> None:
        """On the main thread: publish recorded files whose rename failed, and settle rolls whose
        record in Redis went unanswered (recorded: publish; not: delete and roll again)."""
        assert self._event_log is not None
        if self._unpublished:
            try:
                self._event_log.publish(self._unpublished)
            except OSError:
                pass  # still failing: next time
            else:
                log.info("event log: %d recorded file(s) renamed into place", len(self._unpublished))
                self._forget_rolls([s.name for s in self._unpublished])
                self._unpublished = []
        while self._uncertain:
            roll, staged = self._uncertain[0]
            names = [s.name for s in staged]
            recorded = bool(names) and bool(self._with_retries(lambda names=names: self._recorded(names)))
            self._uncertain.pop(0)
            if recorded:
                self._settle_roll(roll, staged, set(), main_thread=True)
                continue
            self._event_log.discard(staged)
            moved = {p for p, token in roll.tokens.items() if self._tokens.get(p) != token}
            kept = without_partitions(roll.columns, moved)
            self._event_log.put_back(kept)
            self.metrics.log_refused.inc(len(roll.columns[0]) - len(kept[0]))

    def _unwritten(self) -> int:
        """Applied events held in memory, not yet in a recorded part file."""
        assert self._event_log is not None
        n = self._event_log.rows + sum(len(roll.columns[0]) for roll, _ in self._uncertain)
        if self._rolling is not None:
            n += len(self._rolling.columns[0])
        return n

    def _recorded(self, names: list[str]) -> set[str]:
        """Which of these part files belong to rolls recorded in Redis."""
        values = self._redis.hmget(self._rolls_key, names)
        return {name for name, v in zip(names, values, strict=True) if v is not None}

    def _forget_rolls(self, names: list[str]) -> None:
        """Drop the records of published files (one attempt: a leftover record is harmless)."""
        if not names:
            return
        try:
            self._redis.hdel(self._rolls_key, *names)
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            log.debug("event log: forgetting recorded rolls failed (%s)", exc)

    def _resolve_leftovers(self) -> None:
        """Settle part files left under temporary names by event-log writers that stopped."""
        if self._event_log is None:
            return
        try:
            published, _ = self._event_log.resolve_leftovers(self._recorded)
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            log.warning("event log: could not settle files left by stopped writers yet (%s)", exc)
            return
        self._forget_rolls([p.name for p in published])
