"""The stream consumer: Kafka ``user-events`` -> features in Redis, each valid event applied exactly once.

How exactly-once works (the full argument is in ``docs/FEATURES.md``):

* **Offset fence.** Redis holds, per partition, the last offset whose effects are in the features
  (``recstack:stream:<topic>:applied``). Each batch is ONE Lua script call
  (:class:`feature_store.online.FeatureWriter`) that checks those offsets still hold what this
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
  event once (``_check_fences``).
* **Redis Cluster** (``--redis redis+cluster://...``): event ids are claimed for their records
  before any write, and each node gets one script guarded by per-slot fences
  (:mod:`feature_store.cluster`); the partition's applied offset moves once every node has written.
* **Dead letters** are sent and acknowledged before the batch's offsets are stored, so a crash
  can repeat a dead letter (at least once, identified by its source headers) but never lose one.
  One the DLQ topic refuses is sent truncated; one that cannot be sent (topic missing) holds its
  partition at that record, paused and retried (:mod:`services.stream.deadletter`).

Threads: the main thread polls, parses, plans and aggregates; one writer thread runs the batch's
script while the main thread polls and parses the next batch (which is planned only once that
write is done, since its fence expects it); one thread writes event-log files. kafka-python runs
the rebalance callbacks on its IO thread while the main thread waits inside ``poll``.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import signal
import threading
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import prometheus_client  # noqa: F401  (before Feast, see services/stream/cli.py)
import redis
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, SaslAuthenticationFailedError
from kafka.structs import MemberState, OffsetAndMetadata
from redis.exceptions import RedisClusterException

from feature_store.cluster import ClusterFeatureWriter
from feature_store.writes import ApplyResult, BatchGuard, FeatureWriter
from recstack import redis_url as redis_urls
from recstack.credentials import check_redis_auth, redact_url
from recstack.errors import UserError
from recstack.events import Event, InvalidEvent, parse_events, refuse_future_events
from services.stream import deadletter
from services.stream.aggregate import aggregate
from services.stream.config import StreamConfig
from services.stream.eventlog import EventLog, Staged, partitions_of, without_partitions
from services.stream.metrics import StreamMetrics

log = logging.getLogger(__name__)

SEEN_PREFIX = b"recstack:eid:"
_BACKOFF_START_S = 0.1
_BACKOFF_MAX_S = 5.0
_METADATA_RECHECK_S = 5.0
_JOIN_STUCK_S = 30.0
_ROLL_RETRY_S = 5.0  # a failed roll is tried again this soon (or after --log-roll-s, if shorter)
# How often the partitions' applied offsets are read back from Redis to catch writes Redis lost
# (a restart from an old AOF or RDB file, a failover to a lagging replica) even when no batch
# follows to be refused: one HMGET of a few fields, negligible next to the batches' scripts.
_FENCE_CHECK_S = 5.0
# On a Redis Cluster a node other than the one holding the partitions' applied offsets may lose
# writes: its slot fences are read back (one pipelined HMGET per slot written, each node in
# parallel) after every Redis error and this often, when reading thousands of keys costs little.
_SLOT_FENCE_CHECK_S = 30.0


def seen_key(event_id: str) -> bytes:
    """The dedup key of an event id (a 128-bit digest keeps keys short whatever the id's length)."""
    return SEEN_PREFIX + hashlib.blake2b(event_id.encode(), digest_size=16).digest()


def applied_key(topic: str) -> str:
    """Hash partition -> last offset applied to the features."""
    return f"recstack:stream:{topic}:applied"


def logged_key(topic: str) -> str:
    """Hash partition -> last offset whose events are in rolled event-log files."""
    return f"recstack:stream:{topic}:logged"


def log_owners_key(topic: str) -> str:
    """Hash partition -> token of the consumer whose rolls may log that partition's events
    (hash-tagged with the logged key: one slot on a Redis Cluster, so one script sees both)."""
    return "{" + logged_key(topic) + "}:owners"


def log_rolls_key(topic: str) -> str:
    """Hash part-file name -> 1: rolls recorded as part of the log whose files may still wait
    under their temporary names (removed once renamed into place)."""
    return "{" + logged_key(topic) + "}:rolls"


# Take partitions for the event log: a fresh owner token, and the logged offsets as they stand
# once it is set (a roll of the previous owner either went through before, or is refused after).
# KEYS: logged, owners. ARGV: token, partition...
_TAKE_LOG = """
local out = {}
for i = 2, #ARGV do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[1])
  out[#out + 1] = redis.call('HGET', KEYS[1], ARGV[i])
end
return out
"""

# Record a roll if every partition in it is still owned by the token it was taken with: raise the
# logged offsets (never lower them) and record its files. Otherwise change nothing and return the
# partitions owned by someone else. KEYS: logged, owners, rolls. ARGV: n, (partition, token,
# offset or -1) * n, file name...
_COMMIT_ROLL = """
local n = tonumber(ARGV[1])
local refused = {}
for i = 0, n - 1 do
  local p = ARGV[2 + 3 * i]
  if redis.call('HGET', KEYS[2], p) ~= ARGV[3 + 3 * i] then refused[#refused + 1] = p end
end
if #refused > 0 then return refused end
for i = 0, n - 1 do
  local p, offset = ARGV[2 + 3 * i], ARGV[4 + 3 * i]
  if tonumber(offset) > tonumber(redis.call('HGET', KEYS[1], p) or '-1') then
    redis.call('HSET', KEYS[1], p, offset)
  end
end
for j = 2 + 3 * n, #ARGV do redis.call('HSET', KEYS[3], ARGV[j], '1') end
return refused
"""

# After Redis lost writes: take partitions again (a fresh owner token) and raise their logged
# offsets back to what this consumer knows its recorded rolls made durable (their files exist);
# returns the logged offsets as they then stand. KEYS: logged, owners. ARGV: token, (partition,
# offset or -1)...
_RETAKE_LOG = """
local out = {}
for i = 2, #ARGV, 2 do
  local p, floor = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('HSET', KEYS[2], p, ARGV[1])
  local logged = tonumber(redis.call('HGET', KEYS[1], p) or '-1')
  if floor > logged then
    redis.call('HSET', KEYS[1], p, floor)
    logged = floor
  end
  out[#out + 1] = logged
end
return out
"""


class _Stopping(Exception):
    """Stop was requested while a batch was still waiting for Redis or Kafka: abandon it uncommitted."""


@dataclass(slots=True)
class _Plan:
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
class _Batch:
    """One polled batch on its way to Redis, across attempts."""

    records: list[Any]
    parsed: list[Event | InvalidEvent]
    started: float
    polled: dict[int, int]  # partition -> last offset polled
    plan: _Plan = field(default_factory=_Plan)
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
    def parse(cls, polled: dict[TopicPartition, list[Any]], max_future_skew_s: float) -> _Batch:
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


@dataclass(slots=True)
class _Roll:
    """Event-log files being staged, the offsets they make durable once recorded, and the owner
    tokens under which they may be recorded."""

    future: Future  # EventLog.stage -> list[Staged]
    columns: list[list]  # the events, as the event log's columns
    marks: dict[int, int]  # partition -> last offset whose events are in these files (or earlier ones)
    tokens: dict[int, str]  # partition -> owner token, for every partition in marks or in columns


class _Listener(AsyncConsumerRebalanceListener):
    # kafka-python runs these on its IO thread while the main thread waits inside poll(), so the
    # consumer's state is not touched concurrently. Blocking Kafka calls are not allowed here.
    def __init__(self, owner: StreamConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._owner._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._owner._on_assigned(assigned)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self._owner._on_revoked(lost, lost=True)


class StreamConsumer:
    """Runs until :meth:`stop` (or SIGTERM/SIGINT through :func:`run`); see the module docstring."""

    def __init__(self, config: StreamConfig, metrics: StreamMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or StreamMetrics()
        self._stop = threading.Event()
        self._cluster = redis_urls.is_cluster(config.redis)
        self._redis = redis_urls.connect(config.redis, socket_timeout=10, socket_connect_timeout=5)
        writer = ClusterFeatureWriter if self._cluster else FeatureWriter
        self._writer = writer(self._redis, config.trending_half_life_s)
        self._take_log = self._redis.register_script(_TAKE_LOG)
        self._commit_roll = self._redis.register_script(_COMMIT_ROLL)
        self._retake_log = self._redis.register_script(_RETAKE_LOG)
        self._half_life_ms = config.trending_half_life_s * 1000.0
        self._applied_key = applied_key(config.topic)
        self._logged_key = logged_key(config.topic)
        self._log_keys = [self._logged_key, log_owners_key(config.topic)]
        self._rolls_key = log_rolls_key(config.topic)
        self._event_log = (
            EventLog(config.event_log, config.log_roll_rows, config.log_roll_s) if config.event_log else None
        )
        self._applied: dict[int, int] = {}  # partition -> last applied offset, as last seen in Redis
        self._logged: dict[int, int] = {}  # partition -> last offset in rolled event-log files
        self._position: dict[int, int] = {}  # partition -> next offset after what was processed
        self._unpositioned: set[TopicPartition] = set()  # assigned, paused until positioned
        self._consumer: KafkaConsumer | None = None
        self._dead_letters: deadletter.DeadLetters | None = None
        self._holds = deadletter.Holds(config, self.metrics)  # partitions whose dead letter waits
        # One Redis write in flight at a time, on this thread, while the main thread polls and
        # parses the next batch (redis-py waits for the reply without holding the GIL).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-writer")
        self._inflight: _Batch | None = None
        self._metadata_checked = time.monotonic()
        self._unassigned_since: float | None = None  # since when the group has not been stable
        # Event-log files are written on their own thread: a roll of 30 s of events takes a while.
        self._log_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-eventlog")
        self._rolling: _Roll | None = None
        self._tokens: dict[int, str] = {}  # partition -> our owner token for the event log
        # Rolls whose record in Redis failed without an answer (on the IO thread): settled on the main thread.
        self._uncertain: list[tuple[_Roll, list[Staged]]] = []
        self._unpublished: list[Staged] = []  # recorded in Redis, rename failed: tried again
        self._paused = False  # partitions paused: too many events wait for the event log
        self._log_failing = False  # the last roll failed to write
        # Lost writes (see _check_fences): when the fences were last read back, whether a Redis
        # error since calls for reading them at once, batches given up because their fence had
        # gone back, and partition -> offset up to which re-applied records are already logged.
        self._fences_checked = self._slot_fences_checked = time.monotonic()
        self._fences_suspect = False
        self._abandoned: list[_Batch] = []
        self._behind: dict[int, int] = {}  # partition -> a stored fence found behind by a batch
        self._no_relog: dict[int, int] = {}

    # ------------------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask the loop to finish its batch, roll the event log, commit and leave the group."""
        self._stop.set()

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
                consumer = self._consumer  # replaced when joining the group gets stuck
                assert consumer is not None
                try:
                    batch = consumer.poll(timeout_ms=cfg.poll_timeout_ms, max_records=cfg.max_batch)
                except KafkaError as exc:
                    log.warning("poll failed (%s); retrying", exc)
                    self._stop.wait(1.0)
                    continue
                self._position_assigned()
                if self._holds:
                    self._holds.tick(consumer, self._position, can_resume=not self._paused)
                if consumer.assignment():
                    self._unassigned_since = None
                elif not batch:
                    self._while_unassigned()
                    continue
                batch = {tp: recs for tp, recs in batch.items() if tp not in self._unpositioned and recs}
                # Parse this batch while the previous one's Redis write is still running, then
                # finish that write before planning this one (its fence expects that write).
                started = _Batch.parse(batch, cfg.max_future_skew) if batch else None
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
        except _Stopping:
            log.info("stopping with a batch not applied; it will be read again")
        finally:
            try:
                self._finish_inflight()
            except _Stopping:
                log.info("stopping with a batch not applied; it will be read again")
            self._shutdown()

    def _subscribe(self) -> None:
        assert self._consumer is not None
        try:
            # Know the topic's partitions before joining: a join without them yields an empty
            # assignment and an immediate second join, which kafka-python does not always survive.
            self._consumer.partitions_for_topic(self.config.topic)
        except KafkaError as exc:
            log.warning("no metadata for %s yet (%s)", self.config.topic, exc)
        self._consumer.subscribe([self.config.topic], listener=_Listener(self))
        self._metadata_checked = self._unassigned_since = time.monotonic()

    def _while_unassigned(self) -> None:
        """No partitions: wait a little instead of spinning, refresh the topic metadata now and
        then (kafka-python can join before it knows the topic's partitions, then wait for its
        periodic metadata refresh), and start over with a new client if joining the group does
        not finish (seen with kafka-python 3.0 after a join that got no partitions)."""
        assert self._consumer is not None
        now = time.monotonic()
        if now - self._metadata_checked >= _METADATA_RECHECK_S:
            self._metadata_checked = now
            try:
                self._consumer.topics()  # a metadata request: a change in partitions triggers a rejoin
            except KafkaError as exc:
                log.warning("metadata refresh failed (%s)", exc)
        stable = self._consumer.group_metadata().state == MemberState.STABLE
        if stable or self._unassigned_since is None:
            self._unassigned_since = None if stable else now
        elif now - self._unassigned_since > _JOIN_STUCK_S:
            log.warning(
                "joining group %s has not finished in %.0f s; reconnecting", self.config.group, _JOIN_STUCK_S
            )
            self._consumer.close(autocommit=False)
            self._consumer = None
            self._connect()
            self._subscribe()
        self._finish_inflight()
        if self._event_log is not None:
            self._finish_roll(main_thread=True)
            self._settle_pending()
        self._stop.wait(self.config.poll_timeout_ms / 1000)

    def _connect(self) -> None:
        cfg = self.config
        delay = _BACKOFF_START_S
        while True:
            try:
                self._consumer = KafkaConsumer(
                    bootstrap_servers=cfg.bootstrap,
                    group_id=cfg.group,
                    client_id=cfg.client_id,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    max_poll_records=cfg.max_batch,
                    session_timeout_ms=cfg.session_timeout_ms,
                    heartbeat_interval_ms=max(1_000, cfg.session_timeout_ms // 3),
                    max_partition_fetch_bytes=4 * 1024 * 1024,
                    metadata_max_age_ms=30_000,  # partitions added to the topic are seen within 30 s
                    fetch_max_bytes=64 * 1024 * 1024,
                    # CRC32C in pure Python costs ~40 us per record (a 7x slowdown); the broker
                    # verifies CRCs when records are written and TCP protects them in transit.
                    check_crcs=False,
                    **cfg.kafka_security.client_options(),
                )
                if self._dead_letters is None:
                    producer = deadletter.make_producer(cfg)
                    self._dead_letters = deadletter.DeadLetters(producer, cfg, self.metrics)
                return
            except SaslAuthenticationFailedError as exc:
                if self._consumer is not None:
                    self._consumer.close(autocommit=False)
                    self._consumer = None
                raise UserError(
                    f"Kafka at {cfg.bootstrap} refused the SASL credentials ({exc}); check "
                    "--kafka-sasl-username, --kafka-sasl-mechanism and the password "
                    "(RECSTACK_KAFKA_SASL_PASSWORD or --kafka-sasl-password-file)"
                ) from None
            except KafkaError as exc:
                if self._consumer is not None:
                    self._consumer.close(autocommit=False)
                    self._consumer = None
                if self._stop.wait(delay):
                    raise _Stopping from exc
                # A broker refusing SASL credentials just closes the connection: say where to look.
                hint = (
                    "; if the broker is up, check --kafka-sasl-username, --kafka-sasl-mechanism and "
                    "the password (RECSTACK_KAFKA_SASL_PASSWORD or --kafka-sasl-password-file)"
                    if cfg.kafka_security.protocol.startswith("SASL_")
                    else ""
                )
                log.warning("Kafka at %s not available (%s)%s; retrying", cfg.bootstrap, exc, hint)
                delay = min(delay * 2, _BACKOFF_MAX_S)

    def _require_dlq_topic(self) -> None:
        """Stop at start-up, naming it, if the dead-letter topic does not exist."""
        delay = _BACKOFF_START_S
        while True:
            assert self._consumer is not None
            try:
                deadletter.require_topic(self._consumer, self.config)
                return
            except UserError:
                self._consumer.close(autocommit=False)
                if self._dead_letters is not None:
                    self._dead_letters.producer.close(timeout=5)
                raise
            except KafkaError as exc:
                log.warning("listing Kafka topics failed (%s); retrying", exc)
                if self._stop.wait(delay):
                    raise _Stopping from exc
                delay = min(delay * 2, _BACKOFF_MAX_S)

    def _shutdown(self) -> None:
        try:
            if self._event_log is not None:
                self._roll(main_thread=True)
                self._settle_pending()
            elif self._consumer is not None:
                self._commit(dict(self._position), sync=True)
        except (_Stopping, redis.RedisError, RedisClusterException, KafkaError) as exc:
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

    # ------------------------------------------------------------------------------ rebalance

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        # Redis reads may need retries, which must not stall the IO thread's heartbeats: pause the
        # partitions here and position them on the main thread right after poll returns.
        fresh = {tp for tp in assigned if tp.partition not in self._position}
        if fresh and self._consumer is not None:
            self._consumer.pause(*fresh)
            self._unpositioned |= fresh
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))

    def _on_revoked(self, revoked: set[TopicPartition], lost: bool = False) -> None:
        log.info("%s partitions %s", "lost" if lost else "revoked", sorted(tp.partition for tp in revoked))
        batch, self._inflight = self._inflight, None
        if batch is not None:  # account for the write in flight; a refused one is left to the next owner
            outcome = batch.first_outcome()
            if outcome is None or isinstance(outcome, ApplyResult) and outcome.ok:
                self._book(batch)
            else:
                log.warning(
                    "batch in flight at revocation not applied (%s); the next owner reads it", outcome
                )
        gone = {tp.partition for tp in revoked}
        self._holds.forget(gone)
        if self._dead_letters is not None:
            self._dead_letters.forget(gone)
        if self._event_log is not None:
            try:
                if lost:
                    # Another member owns them now (this one was away: hung, cut off) and logs what
                    # was applied here from the last logged offset on. A roll already writing is
                    # finished: the ownership fence in Redis decides whether it still counts.
                    self._finish_roll(main_thread=False, wait=True)
                else:
                    self._roll(main_thread=False)
            except (_Stopping, redis.RedisError, RedisClusterException, OSError) as exc:
                log.warning("roll before giving partitions up failed (%s); their new owner re-reads", exc)
            left = self._event_log.drop_partitions(gone)
            if left:
                log.warning(
                    "partitions %s %s: %d events not yet logged are left to their new owner",
                    sorted(gone),
                    "lost" if lost else "revoked",
                    left,
                )
            if not self._event_log.rows:
                self.metrics.log_unwritten.set(0)
        elif not lost:
            self._commit(dict(self._position), sync=False)
        for tp in revoked:
            self._tokens.pop(tp.partition, None)
            self._applied.pop(tp.partition, None)
            self._logged.pop(tp.partition, None)
            self._position.pop(tp.partition, None)
            self._no_relog.pop(tp.partition, None)
            self._behind.pop(tp.partition, None)
            self._unpositioned.discard(tp)
            with warnings.catch_warnings():  # Feast's import claims multi-process mode; not ours
                warnings.simplefilter("ignore")
                try:
                    self.metrics.lag.remove(str(tp.partition))
                except KeyError:
                    pass

    def _position_assigned(self) -> None:
        """Seek newly assigned partitions: after the logged offset (event log on) or the applied one."""
        if not self._unpositioned or self._consumer is None:
            return
        tps = sorted(self._unpositioned, key=lambda tp: tp.partition)
        parts = [tp.partition for tp in tps]
        if self._event_log is not None:
            self._resolve_leftovers()  # a rebalance often follows a crash: settle what it left
            applied, logged = self._with_retries(lambda: self._take_partitions(parts))
        else:
            applied, logged = self._with_retries(lambda: self._read_offsets(parts))
        for tp in tps:
            p = tp.partition
            self._applied[p] = applied[p]
            self._logged[p] = logged[p]
            start = (logged[p] if self._event_log is not None else applied[p]) + 1
            if start > 0:
                self._consumer.seek(tp, start)
            # else nothing is known in Redis: Kafka's committed offset, or the beginning
            self._position[p] = start if start > 0 else -1  # -1: known once records arrive
            log.info(
                "partition %d: applied %d, logged %d, reading from %d (-1: the committed offset)",
                p,
                applied[p],
                logged[p],
                self._position[p],
            )
        if not self._paused:  # else they stay paused until the event log is written again
            self._consumer.resume(*tps)
        self._unpositioned.clear()

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

    def _check_fences(self, started: _Batch | None) -> _Batch | None:
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

    # ------------------------------------------------------------------------------ batches

    def _begin(self, batch: _Batch) -> _Batch:
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

    def _attempt(self, batch: _Batch) -> ApplyResult | BaseException | None:
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
                delay = min(_BACKOFF_START_S * 2 ** min(batch.attempt, 10), _BACKOFF_MAX_S)
                log.warning(
                    "batch write failed (%s: %s); retry %d in %.1fs",
                    type(outcome).__name__,
                    outcome,
                    batch.attempt,
                    delay,
                )
                if self._stop.wait(delay):
                    self._inflight = None
                    raise _Stopping from outcome
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

    def _resolve(self, batch: _Batch, result: ApplyResult) -> bool:
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

    def _book(self, batch: _Batch) -> None:
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
    ) -> _Plan:
        plan = _Plan()
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

    def _prepare(self, batch: _Batch) -> tuple | None:
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

    def _cluster_deltas(self, batch: _Batch) -> tuple[dict, dict, dict[int, set[int]]]:
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

    def _dead_letter(self, batch: _Batch) -> _Plan:
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

    # ------------------------------------------------------------------------------ roll & commit

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
        self._rolling = _Roll(future, columns, marks, tokens)

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
        except _Stopping:
            self._uncertain.append((roll, staged))
            raise
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            self._uncertain.append((roll, staged))
            log.warning("event log: recording a roll failed (%s); it is settled once Redis answers", exc)
            return
        self._settle_roll(roll, staged, {int(p) for p in refused}, main_thread)

    def _settle_roll(self, roll: _Roll, staged: list[Staged], refused: set[int], main_thread: bool) -> None:
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

    def _backpressure(self) -> None:
        """Pause every assigned partition while too many events wait for the event log; resume
        once a roll brings them under the limit (``--eventlog-max-unwritten``)."""
        consumer = self._consumer
        if consumer is None or self._event_log is None:
            return
        waiting = self._unwritten()
        if self._log_failing:
            self.metrics.log_unwritten.set(waiting)
        limit = self.config.eventlog_max_unwritten
        assigned = consumer.assignment()
        if waiting >= limit:
            if not self._paused:
                self._paused = True
                self.metrics.paused.set(1)
                log.warning(
                    "event log: %d events wait in memory (limit %d, --eventlog-max-unwritten): pausing "
                    "partitions %s until a roll succeeds; features stop updating meanwhile",
                    waiting,
                    limit,
                    sorted(tp.partition for tp in assigned),
                )
            todo = assigned - consumer.paused()  # a partition assigned since comes unpaused
            if todo:
                consumer.pause(*todo)
        elif self._paused:
            self._paused = False
            self.metrics.paused.set(0)
            resume = assigned - self._unpositioned - self._holds.waiting()
            if resume:
                consumer.resume(*resume)
            log.warning(
                "event log: written again (%d events wait); resuming partitions %s",
                waiting,
                sorted(tp.partition for tp in resume),
            )

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

    def _commit(self, positions: dict[int, int], sync: bool) -> None:
        """Commit next-offsets to Kafka (a convenience: Redis holds the offsets that matter)."""
        assert self._consumer is not None
        offsets = {
            TopicPartition(self.config.topic, p): OffsetAndMetadata(pos, "", -1)
            for p, pos in positions.items()
            if pos >= 0
        }
        if not offsets:
            return
        try:
            if sync:
                self._consumer.commit(offsets)
            else:
                self._consumer.commit_async(offsets)
        except KafkaError as exc:
            log.warning("offset commit failed (%s); continuing", exc)

    # ------------------------------------------------------------------------------ helpers

    def _with_retries(self, call):
        delay = _BACKOFF_START_S
        while True:
            try:
                return call()
            except (redis.RedisError, RedisClusterException, OSError) as exc:
                self.metrics.redis_retries.inc()
                self._fences_suspect = True
                log.warning("Redis call failed (%s); retrying in %.1fs", exc, delay)
                if self._stop.wait(delay):
                    raise _Stopping from exc
                delay = min(delay * 2, _BACKOFF_MAX_S)

    def _update_lag(self) -> None:
        if self._consumer is None:
            return
        for p, pos in self._position.items():
            high = self._consumer.highwater(TopicPartition(self.config.topic, p))
            if high is not None and pos >= 0:
                self.metrics.lag.labels(str(p)).set(max(0, high - pos))


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
    except _Stopping:
        pass
    return 0
