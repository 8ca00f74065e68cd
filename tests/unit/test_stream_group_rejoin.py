"""kafka-python 3.0.12 can leave a consumer-group rebalance half done: the leader's rejoin check
turns false as soon as it has computed the new assignment, so a ``poll`` whose timer runs out
before the SyncGroup answer never comes back for it. The member then stays out of the group with
its partitions neither fetched nor handed back. The stream consumer notices after each poll and
asks for the rejoin again. A fake client stands in for kafka-python here; no broker or Redis is
reached (tests/integration/test_stream_group_join.py forces the same state on the real broker)."""

from __future__ import annotations

import pytest

from services.stream.config import StreamConfig


class _FakeCoordinator:
    def __init__(self, rejoining: bool, rejoin_needed: bool) -> None:
        self.rejoining = rejoining  # a rebalance began: partitions revoked, JoinGroup sent
        self.rejoin_needed = rejoin_needed
        self.requests = 0

    def need_rejoin(self) -> bool:
        return self.rejoin_needed

    def request_rejoin(self) -> None:
        self.requests += 1
        self.rejoin_needed = True


class _FakeConsumer:
    def __init__(self, coordinator: _FakeCoordinator, topic: str) -> None:
        from kafka import TopicPartition

        self._coordinator = coordinator
        self._assigned = {TopicPartition(topic, p) for p in range(3)}  # still held: eager rebalance
        self.polls = 0

    def poll(self, timeout_ms: int, max_records: int) -> dict:
        self.polls += 1
        return {}

    def assignment(self) -> set:
        return set(self._assigned)

    def group_metadata(self):
        from types import SimpleNamespace

        from kafka.structs import MemberState

        # What JoinWatch reads (30 s of this and the client is replaced; these tests take less).
        return SimpleNamespace(
            state=MemberState.REBALANCING if self._coordinator.rejoining else MemberState.STABLE
        )


@pytest.fixture
def stream_consumer(tmp_path):
    import prometheus_client  # noqa: F401  (before Feast, as services/stream/cli.py does)

    from services.stream.consumer import StreamConsumer

    config = StreamConfig(event_log="", metrics_port=0, redis="redis://127.0.0.1:1/0")
    consumer = StreamConsumer(config)
    yield consumer
    consumer._executor.shutdown()
    consumer._log_executor.shutdown()


@pytest.mark.parametrize(
    ("rejoining", "rejoin_needed", "requested"),
    [
        (True, False, 1),  # the rebalance was left half done: ask for the rejoin again
        (True, True, 0),  # still joining: kafka-python's next poll goes on with it
        (False, False, 0),  # a stable member
    ],
)
def test_a_rebalance_left_half_done_is_joined_again(stream_consumer, rejoining, rejoin_needed, requested):
    coordinator = _FakeCoordinator(rejoining, rejoin_needed)
    client = _FakeConsumer(coordinator, stream_consumer.config.topic)
    stream_consumer._consumer = client
    assert stream_consumer._poll() == {}
    assert client.polls == 1
    assert coordinator.requests == requested
    assert coordinator.need_rejoin() is (rejoin_needed or requested > 0)
    stream_consumer._poll()  # asked once: the next poll goes on with the join
    assert coordinator.requests == requested


def test_a_client_without_the_coordinator_is_left_alone():
    from services.stream.kafka_side import finish_abandoned_rebalance

    class Client:  # another kafka-python release may name its parts differently
        pass

    assert finish_abandoned_rebalance(Client()) is False
