"""The stream consumer's Kafka side: the client and its consumer-group membership (connecting,
subscribing, rejoining a group that does not settle), each poll, the rebalance listener (assigned
partitions positioned from the offsets in Redis, revoked or lost ones handed over), pausing for
the event log, and the lag metric. Offsets are committed through ``ConsumerState._commit``.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import redis
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, SaslAuthenticationFailedError
from kafka.structs import MemberState
from redis.exceptions import RedisClusterException

from feature_store.writes import ApplyResult
from recstack.errors import UserError
from services.stream import deadletter
from services.stream.config import StreamConfig
from services.stream.metrics import StreamMetrics
from services.stream.pipeline import ApplyPipeline
from services.stream.state import BACKOFF_MAX_S, BACKOFF_START_S, Stopping, log

_METADATA_RECHECK_S = 5.0
_JOIN_STUCK_S = 30.0


def group_member_options(cfg: Any) -> dict[str, Any]:
    """KafkaConsumer options of a group member whose offsets that matter live in Redis (the stream
    and attribution consumers): no auto-commit, positions set from Redis on assignment. ``cfg``
    has bootstrap, group, client_id, max_batch, session_timeout_ms and kafka_security."""
    return {
        "bootstrap_servers": cfg.bootstrap,
        "group_id": cfg.group,
        "client_id": cfg.client_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": cfg.max_batch,
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": max(1_000, cfg.session_timeout_ms // 3),
        # CRC32C in pure Python costs ~40 us per record (a 7x slowdown); the broker verifies CRCs
        # when records are written and TCP protects them in transit.
        "check_crcs": False,
        **cfg.kafka_security.client_options(),
    }


def finish_abandoned_rebalance(consumer: Any) -> bool:
    """Ask kafka-python to rejoin when it has left a rebalance half done; True if it asked.

    kafka-python 3.0.12 rejoins while ``need_rejoin()`` holds. When that is because the topic's
    partitions differ from those the leader last assigned (at every start, its first assignment
    predates that metadata; and when partitions are added), the check turns false as soon as the
    leader has computed the next assignment, inside the JoinGroup/SyncGroup exchange. If the
    ``poll`` timer runs out before the SyncGroup answer, no later poll takes the join's result: the
    member stays REBALANCING with its revoked partitions held but never fetched, stops heartbeating
    and is dropped by the broker, and nothing is logged above DEBUG. (Kafka's Java client keeps the
    rejoin requested in that case: KAFKA-9815.) Called after each poll, while kafka-python is not
    running the join: ``rejoining`` is set from the revocation until a join completes, so seeing it
    with no rejoin pending is that state; ``request_rejoin()`` makes the next poll finish the join
    (or start a new one if its answer came meanwhile). The private coordinator is kafka-python's
    (pinned in pyproject.toml); a client without one is left alone."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or not getattr(coordinator, "rejoining", False) or coordinator.need_rejoin():
        return False
    coordinator.request_rejoin()
    return True


class JoinWatch:
    """Whether a group member's join has been unfinished for longer than ``stuck_s``, read after
    polls that returned nothing (the stream and attribution consumers start over with a new
    client then). The safety net behind :func:`finish_abandoned_rebalance`, for a join that stays
    unfinished for any other reason. kafka-python's ``assignment()`` keeps listing the previous
    generation's partitions until a join completes, so only the member state tells."""

    def __init__(self, stuck_s: float = _JOIN_STUCK_S) -> None:
        self.stuck_s = stuck_s
        self._since: float | None = None

    def joining(self) -> None:
        """A join starts now (after subscribe)."""
        self._since = time.monotonic()

    def after_poll(self, consumer: Any, group: str, read_anything: bool) -> bool:
        """After each poll: finish a rebalance kafka-python left half done, and say (True) when
        the client should be replaced because its join is stuck."""
        if finish_abandoned_rebalance(consumer):
            log.info("group %s: the rebalance kafka-python left unfinished is joined again", group)
        if read_anything or not self.stuck(consumer):
            return False
        log.warning("joining group %s has not finished in %.0f s; reconnecting", group, self.stuck_s)
        return True

    def stuck(self, consumer: Any) -> bool:
        now = time.monotonic()
        if consumer.group_metadata().state == MemberState.STABLE:
            self._since = None
            return False
        if self._since is None:
            self._since = now
            return False
        return now - self._since > self.stuck_s


class RebalanceListener(AsyncConsumerRebalanceListener):
    """Hands rebalances to ``owner._on_assigned`` / ``owner._on_revoked`` (shared with the
    attribution consumer, :mod:`services.attribution.consumer`)."""

    # kafka-python runs these on its IO thread while the main thread waits inside poll(), so the
    # consumer's state is not touched concurrently. Blocking Kafka calls are not allowed here.
    def __init__(self, owner: Any) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._owner._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._owner._on_assigned(assigned)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self._owner._on_revoked(lost, lost=True)


class KafkaSide(ApplyPipeline):
    """The Kafka client and the group's partitions (see the module docstring); polled batches go
    to the apply pipeline underneath."""

    def __init__(self, config: StreamConfig, metrics: StreamMetrics | None = None) -> None:
        super().__init__(config, metrics)
        self._unpositioned: set[TopicPartition] = set()  # assigned, paused until positioned
        self._metadata_checked = time.monotonic()
        self._join = JoinWatch()

    def _poll(self) -> dict[TopicPartition, list[Any]] | None:
        """One poll: the records of positioned partitions, or None when there is nothing to do
        this time round (the poll failed, or no partitions are assigned yet)."""
        cfg = self.config
        consumer = self._consumer  # replaced when joining the group gets stuck
        assert consumer is not None
        try:
            batch = consumer.poll(timeout_ms=cfg.poll_timeout_ms, max_records=cfg.max_batch)
        except KafkaError as exc:
            log.warning("poll failed (%s); retrying", exc)
            self._stop.wait(1.0)
            return None
        if self._join.after_poll(consumer, cfg.group, bool(batch)):
            # Also while partitions are still listed as assigned: during a rebalance kafka-python
            # keeps the old assignment until the join completes, so a join that never completes
            # looks assigned (and reads nothing) for ever.
            self._reconnect()
            consumer = self._consumer
            assert consumer is not None
        self._position_assigned()
        if self._holds:
            self._holds.tick(consumer, self._position, can_resume=not self._paused)
        if not consumer.assignment() and not batch:
            self._while_unassigned()
            return None
        return {tp: recs for tp, recs in batch.items() if tp not in self._unpositioned and recs}

    # ------------------------------------------------------------------------------ group

    def _subscribe(self) -> None:
        assert self._consumer is not None
        try:
            # Know the topic's partitions before joining: a join without them yields an empty
            # assignment and an immediate second join, which kafka-python does not always survive.
            self._consumer.partitions_for_topic(self.config.topic)
        except KafkaError as exc:
            log.warning("no metadata for %s yet (%s)", self.config.topic, exc)
        self._consumer.subscribe([self.config.topic], listener=RebalanceListener(self))
        self._metadata_checked = time.monotonic()
        self._join.joining()

    def _reconnect(self) -> None:
        assert self._consumer is not None
        # Partitions this member still holds state for go as if lost: whichever member gets
        # them next (this one too) positions them from the offsets in Redis.
        held = {
            tp
            for tp in self._consumer.assignment()
            if tp.partition in self._position or tp in self._unpositioned
        }
        if held:
            self._on_revoked(held, lost=True)
        self._consumer.close(autocommit=False)
        self._consumer = None
        self._connect()
        self._subscribe()

    def _while_unassigned(self) -> None:
        """No partitions: wait a little instead of spinning, and refresh the topic metadata now
        and then (kafka-python can join before it knows the topic's partitions, then wait for its
        periodic metadata refresh)."""
        assert self._consumer is not None
        now = time.monotonic()
        if now - self._metadata_checked >= _METADATA_RECHECK_S:
            self._metadata_checked = now
            try:
                self._consumer.topics()  # a metadata request: a change in partitions triggers a rejoin
            except KafkaError as exc:
                log.warning("metadata refresh failed (%s)", exc)
        self._finish_inflight()
        if self._event_log is not None:
            self._finish_roll(main_thread=True)
            self._settle_pending()
        self._stop.wait(self.config.poll_timeout_ms / 1000)

    def _connect(self) -> None:
        cfg = self.config
        delay = BACKOFF_START_S
        while True:
            try:
                self._consumer = KafkaConsumer(
                    **group_member_options(cfg),
                    max_partition_fetch_bytes=4 * 1024 * 1024,
                    metadata_max_age_ms=30_000,  # partitions added to the topic are seen within 30 s
                    fetch_max_bytes=64 * 1024 * 1024,
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
                    raise Stopping from exc
                # A broker refusing SASL credentials just closes the connection: say where to look.
                hint = (
                    "; if the broker is up, check --kafka-sasl-username, --kafka-sasl-mechanism and "
                    "the password (RECSTACK_KAFKA_SASL_PASSWORD or --kafka-sasl-password-file)"
                    if cfg.kafka_security.protocol.startswith("SASL_")
                    else ""
                )
                log.warning("Kafka at %s not available (%s)%s; retrying", cfg.bootstrap, exc, hint)
                delay = min(delay * 2, BACKOFF_MAX_S)

    def _require_dlq_topic(self) -> None:
        """Stop at start-up, naming it, if the dead-letter topic does not exist."""
        delay = BACKOFF_START_S
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
                    raise Stopping from exc
                delay = min(delay * 2, BACKOFF_MAX_S)

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
            except (Stopping, redis.RedisError, RedisClusterException, OSError) as exc:
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

    def _update_lag(self) -> None:
        if self._consumer is None:
            return
        for p, pos in self._position.items():
            high = self._consumer.highwater(TopicPartition(self.config.topic, p))
            if high is not None and pos >= 0:
                self.metrics.lag.labels(str(p)).set(max(0, high - pos))
