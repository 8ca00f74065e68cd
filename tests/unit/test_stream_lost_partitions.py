"""A consumer that lost all its partitions (hung past its session, cut off) leaves its unlogged
events to their new owner instead of writing them: the owner re-reads and logs them itself, so
writing them here too would put them in the event log twice. No broker or Redis is reached."""

from __future__ import annotations

from recstack.events import Event
from services.stream.config import StreamConfig


def test_lost_partitions_leave_the_buffer_to_their_new_owner(tmp_path):
    import prometheus_client  # noqa: F401  (before Feast, as services/stream/cli.py does)
    from kafka import TopicPartition

    from services.stream.consumer import StreamConsumer

    config = StreamConfig(event_log=str(tmp_path), metrics_port=0, redis="redis://127.0.0.1:1/0")
    consumer = StreamConsumer(config)
    try:
        consumer._position = {0: 11, 1: 6}
        consumer._event_log.append(
            [Event(f"e{i}", "u", "i", "view", 1_714_521_600_000 + i) for i in range(5)], [0, 0, 1, 1, 0]
        )
        lost = {TopicPartition(config.topic, 0), TopicPartition(config.topic, 1)}
        consumer._on_revoked(lost, lost=True)
        assert consumer._event_log.rows == 0
        assert not list(tmp_path.rglob("*.parquet"))  # nothing written: the new owner logs them
        assert consumer._position == {}
    finally:
        consumer._executor.shutdown()
        consumer._log_executor.shutdown()
        consumer._event_log.close()


def test_losing_some_partitions_keeps_the_events_of_the_others(tmp_path):
    import prometheus_client  # noqa: F401
    from kafka import TopicPartition

    from services.stream.consumer import StreamConsumer

    config = StreamConfig(event_log=str(tmp_path), metrics_port=0, redis="redis://127.0.0.1:1/0")
    consumer = StreamConsumer(config)
    try:
        consumer._position = {0: 11, 1: 6}
        events = [Event(f"e{i}", "u", "i", "view", 1_714_521_600_000 + i) for i in range(5)]
        consumer._event_log.append(events, [0, 1, 0, 1, 0])
        consumer._on_revoked({TopicPartition(config.topic, 1)}, lost=True)
        assert consumer._event_log.take()[0] == ["e0", "e2", "e4"]  # partition 0's, in order
        assert consumer._position == {0: 11}
    finally:
        consumer._executor.shutdown()
        consumer._log_executor.shutdown()
        consumer._event_log.close()
