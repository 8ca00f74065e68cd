"""A join that never completes is left for a new client, also while kafka-python still lists the
partitions of the previous generation as assigned (it keeps them until the join completes).
No broker or Redis is reached: the consumer's Kafka client is a fake."""

from __future__ import annotations

from types import SimpleNamespace

from kafka import TopicPartition
from kafka.structs import MemberState

from services.stream import kafka_side
from services.stream.config import StreamConfig


class _StuckClient:
    """Mid-rebalance for ever: revoked partitions still listed, nothing fetched."""

    def __init__(self, topic: str, state: str = MemberState.REBALANCING) -> None:
        self.state = state
        self.closed = False
        self.listed = {TopicPartition(topic, 0), TopicPartition(topic, 1)}

    def poll(self, timeout_ms, max_records):
        return {}

    def assignment(self):
        return set(self.listed)

    def group_metadata(self):
        return SimpleNamespace(state=self.state)

    def close(self, autocommit):
        self.closed = True

    def topics(self):
        return set()


def _consumer(monkeypatch, tmp_path):
    import prometheus_client  # noqa: F401  (before Feast, as services/stream/cli.py does)

    from services.stream.consumer import StreamConsumer

    config = StreamConfig(event_log="", metrics_port=0, redis="redis://127.0.0.1:1/0", poll_timeout_ms=1)
    consumer = StreamConsumer(config)
    clock = SimpleNamespace(now=1_000.0)
    monkeypatch.setattr(kafka_side.time, "monotonic", lambda: clock.now)
    fresh: list[_StuckClient] = []

    def connect():
        consumer._consumer = _StuckClient(config.topic, MemberState.STABLE)
        fresh.append(consumer._consumer)

    monkeypatch.setattr(consumer, "_connect", connect)
    monkeypatch.setattr(consumer, "_subscribe", lambda: None)
    return consumer, clock, fresh


def test_a_join_stuck_with_partitions_still_listed_gets_a_new_client(monkeypatch, tmp_path):
    consumer, clock, fresh = _consumer(monkeypatch, tmp_path)
    try:
        stuck = _StuckClient(consumer.config.topic)
        consumer._consumer = stuck
        consumer._position = {0: 11, 1: 6}  # state from before the rebalance
        for _ in range(3):
            consumer._poll()
            clock.now += 10.0
        assert not stuck.closed  # 20 s: still waiting for the join
        clock.now += 11.0
        consumer._poll()
        assert stuck.closed and consumer._consumer is fresh[0]  # 31 s: started over
        assert consumer._position == {}  # handed over: the next owner positions from Redis
    finally:
        consumer._executor.shutdown()


def test_a_stable_member_that_reads_nothing_keeps_its_client(monkeypatch, tmp_path):
    consumer, clock, fresh = _consumer(monkeypatch, tmp_path)
    try:
        quiet = _StuckClient(consumer.config.topic, MemberState.STABLE)  # a topic with no traffic
        consumer._consumer = quiet
        for _ in range(10):
            consumer._poll()
            clock.now += 10.0
        assert not quiet.closed and not fresh
    finally:
        consumer._executor.shutdown()


def test_the_attribution_consumer_also_leaves_a_stuck_join(monkeypatch):
    from services.attribution.config import AttributionConfig
    from services.attribution.consumer import AttributionConsumer, Part

    clock = SimpleNamespace(now=1_000.0)
    monkeypatch.setattr(kafka_side.time, "monotonic", lambda: clock.now)
    consumer = AttributionConsumer(AttributionConfig(redis="redis://127.0.0.1:1/0", poll_timeout_ms=1))
    stuck = _StuckClient(consumer.config.impressions_topic)
    consumer._consumer = stuck
    consumer._parts = {0: Part("token", 5, 7, 1_700_000_000_000)}
    fresh: list[_StuckClient] = []

    def connect():
        consumer._consumer = _StuckClient(consumer.config.impressions_topic, MemberState.STABLE)
        fresh.append(consumer._consumer)

    monkeypatch.setattr(consumer, "_connect", connect)
    monkeypatch.setattr(consumer, "_plan", lambda p, part: None)  # nothing read: nothing to write
    monkeypatch.setattr(consumer, "_check_fences", lambda: None)
    monkeypatch.setattr(consumer, "_flow_control", lambda: None)
    consumer._poll_once()
    clock.now += 20.0
    consumer._poll_once()
    assert not stuck.closed
    clock.now += 11.0
    consumer._poll_once()
    assert stuck.closed and consumer._consumer is fresh[0] and consumer._parts == {}
