"""Dead letters that cannot be sent as they are, and events stamped far in the future.

Against the real broker and Redis, each case of a dead letter the DLQ topic does not take at once:

* too large once the dead letter's headers are added: a truncated dead letter (value cut to fit,
  original size, SHA-256, reason) lands and the partition goes on;
* the DLQ topic missing at start-up: ``recstack stream`` exits non-zero naming the topic;
* the DLQ topic deleted while the consumer runs: the partition pauses, nothing of it is applied
  or committed past the record, the failures are counted; once the topic is back the partition
  resumes and the dead letter lands exactly once;
* a write the topic refuses even truncated (its ``max.message.bytes`` below the smallest dead
  letter): held like a missing topic, and sent whole once the limit is raised.

And an event stamped in the year 9999 goes to the DLQ naming ``ts`` instead of freezing its
item's ``trending`` and its user's recency.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from test_stream_exactly_once import (
    _config,
    assert_features_exact,
    consumer_process,
    consumer_thread,
    wait_until,
)

pytestmark = pytest.mark.integration

WAIT_S = 60.0
HELD_S = 4.0  # how long a held partition is watched for not moving


def _admin(bootstrap: str):
    from kafka.admin import KafkaAdminClient

    return KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="recstack-tests", request_timeout_ms=10_000
    )


@pytest.fixture
def dlq_topic(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """Factory ``dlq_topic(name, **configs)``: a one-partition topic with these topic configs
    (``max_message_bytes=300`` -> ``max.message.bytes``), deleted at the end of the test."""
    from kafka.admin import NewTopic

    created: list[str] = []

    def make(name: str, **configs: object) -> str:
        admin = _admin(kafka_bootstrap)
        try:
            topic_configs = {k.replace("_", "."): str(v) for k, v in configs.items()}
            admin.create_topics([NewTopic(name, 1, 1, topic_configs=topic_configs)])
            _wait_topic(admin, name, present=True)
        finally:
            admin.close()
        if name not in created:
            created.append(name)
        return name

    yield make
    admin = _admin(kafka_bootstrap)
    try:
        admin.delete_topics(created, timeout_ms=10_000, raise_errors=False)
    finally:
        admin.close()


def _wait_topic(admin, name: str, present: bool) -> None:
    deadline = time.monotonic() + 30
    while (name in admin.list_topics()) != present:
        assert time.monotonic() < deadline, f"topic {name} still {'absent' if present else 'present'}"
        time.sleep(0.2)
    if present:
        admin.wait_for_topics([name], timeout_ms=30_000)


def _event(user: str, item: str, event_type: str, ts_ms: int):
    from recstack.events import Event

    return Event(f"e-{uuid.uuid4().hex}", user, item, event_type, ts_ms)


def _send(bootstrap: str, topic: str, records: list[tuple[int, bytes | None]]) -> list[int]:
    """Send (partition, value) records in order; their offsets."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
    try:
        futures = [producer.send(topic, partition=p, key=b"k", value=v) for p, v in records]
        producer.flush(timeout=30)
        return [f.get(timeout=30).offset for f in futures]
    finally:
        producer.close()


def _offsets(client, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """Applied and logged offsets per partition, as Redis holds them."""
    from services.stream.keys import applied_key, logged_key

    def read(key: str) -> dict[int, int]:
        return {int(p): int(o) for p, o in client.hgetall(key).items()}

    return read(applied_key(topic)), read(logged_key(topic))


def _committed(bootstrap: str, group: str, topic: str, partition: int) -> int | None:
    from kafka import KafkaConsumer, TopicPartition

    probe = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return probe.committed(TopicPartition(topic, partition))
    finally:
        probe.close(autocommit=False)


def _letters(bootstrap: str, topic: str) -> list:
    """Every record of the (one-partition) DLQ topic, up to its end offset now."""
    from kafka import KafkaConsumer, TopicPartition

    tp = TopicPartition(topic, 0)
    reader = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        reader.assign([tp])
        reader.seek_to_beginning(tp)
        end = reader.end_offsets([tp])[tp]
        out: list = []
        deadline = time.monotonic() + 30
        while reader.position(tp) < end and time.monotonic() < deadline:
            for records in reader.poll(timeout_ms=1_000).values():
                out.extend(records)
        return out
    finally:
        reader.close()


def _headers(record) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


def _valid(n: int, partition: int) -> list[tuple[int, bytes]]:
    now = int(time.time() * 1000)
    return [(partition, _event(f"u{partition}", f"i{j}", "view", now).to_json_bytes()) for j in range(n)]


def _stream(kafka_bootstrap, redis_url, topic, dlq, tmp_path):
    return dataclasses.replace(_config(kafka_bootstrap, redis_url, topic, tmp_path / "events"), dlq_topic=dlq)


def test_a_dead_letter_too_large_for_the_dlq_lands_truncated_and_the_partition_goes_on(
    kafka_bootstrap, redis_url, redis_client, fresh_topic, dlq_topic, tmp_path
):
    topic = fresh_topic(2)
    dlq = dlq_topic(f"{topic}.dlq", max_message_bytes=2_000)  # the record fits its own topic, not this one
    big = b'{"event_id": "' + b"x" * 6_000  # malformed: cut JSON
    offsets = _send(kafka_bootstrap, topic, [*_valid(2, 0), (0, big), *_valid(2, 0), *_valid(3, 1)])
    bad_offset = offsets[2]
    with consumer_thread(_stream(kafka_bootstrap, redis_url, topic, dlq, tmp_path)) as consumer:
        wait_until(
            lambda: _offsets(redis_client, topic)[0] == {0: 4, 1: 2},
            WAIT_S,
            "both partitions applied past the too-large dead letter",
        )
        metrics = consumer.metrics
    assert metrics.dead_lettered._value.get() == 1
    assert metrics.dlq_truncated._value.get() == 1
    (letter,) = _letters(kafka_bootstrap, dlq)
    headers = _headers(letter)
    assert (headers["source-partition"], headers["source-offset"]) == ("0", str(bad_offset))
    assert "not JSON" in headers["error"]
    assert headers["original-size"] == str(len(big))
    assert headers["original-sha256"] == hashlib.sha256(big).hexdigest()
    assert "cut to" in headers["truncated"] and str(len(big)) in headers["truncated"]
    assert 0 < len(letter.value) < len(big) and big.startswith(letter.value)


def test_a_missing_dlq_topic_stops_the_consumer_at_start_up(
    kafka_bootstrap, redis_url, fresh_topic, tmp_path
):
    topic = fresh_topic(1)
    missing = f"{topic}.no-such-dlq"
    config = _stream(kafka_bootstrap, redis_url, topic, missing, tmp_path)
    proc = consumer_process(config, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the consumer kept running without its dead-letter topic")
    said = err.decode()
    assert proc.returncode != 0, said
    assert missing in said and "does not exist" in said, said


def test_a_dlq_topic_deleted_while_running_holds_its_partition_until_it_is_back(
    kafka_bootstrap, redis_url, redis_client, fresh_topic, dlq_topic, tmp_path
):
    topic = fresh_topic(2)
    dlq = dlq_topic(f"{topic}.dlq")
    config = _stream(kafka_bootstrap, redis_url, topic, dlq, tmp_path)
    # a first dead letter: the consumer's producer knows the topic when it goes
    first = _send(kafka_bootstrap, topic, [*_valid(1, 0), (0, b"[0]"), *_valid(2, 1)])[1]
    with consumer_thread(config) as consumer:
        wait_until(
            lambda: (
                _offsets(redis_client, topic)[0] == {0: 1, 1: 1}
                and consumer.metrics.dead_lettered._value.get() == 1
            ),
            WAIT_S,
            "the first events and dead letter",
        )
        admin = _admin(kafka_bootstrap)
        try:
            admin.delete_topics([dlq], timeout_ms=10_000)
            _wait_topic(admin, dlq, present=False)
            offsets = _send(kafka_bootstrap, topic, [(0, b"{broken"), *_valid(2, 0), *_valid(2, 1)])
            bad_offset = offsets[0]
            metrics = consumer.metrics
            wait_until(lambda: _offsets(redis_client, topic)[0].get(1) == 3, WAIT_S, "partition 1 to go on")
            time.sleep(HELD_S)  # partition 0 stays before its dead letter, whatever else happens
            applied, logged = _offsets(redis_client, topic)
            assert applied[0] == bad_offset - 1 and logged.get(0, -1) < bad_offset, (applied, logged)
            committed = _committed(kafka_bootstrap, config.group, topic, 0)
            assert committed is None or committed <= bad_offset, committed
            assert metrics.dlq_send_failures._value.get() > 0
            assert metrics.dlq_held._value.get() == 1
            assert metrics.dead_lettered._value.get() == 1

            dlq_topic(dlq)  # back: the partition resumes, the dead letter lands once
            wait_until(
                lambda: _offsets(redis_client, topic)[0].get(0) == bad_offset + 2,
                WAIT_S,
                "partition 0 to resume once the DLQ topic is back",
            )
            wait_until(lambda: metrics.dlq_held._value.get() == 0, 10, "the hold to be cleared")
        finally:
            admin.close()
    letters = _letters(kafka_bootstrap, dlq)  # the first letter went with the deleted topic
    assert [(_headers(r)["source-partition"], _headers(r)["source-offset"]) for r in letters] == [
        ("0", str(bad_offset))
    ], first
    assert letters[0].value == b"{broken" and "truncated" not in _headers(letters[0])
    assert metrics.dead_lettered._value.get() == 2


def test_a_dead_letter_refused_even_truncated_holds_its_partition_until_the_topic_takes_it(
    kafka_bootstrap, redis_url, redis_client, fresh_topic, dlq_topic, tmp_path
):
    from kafka.admin import ConfigResource, ConfigResourceType

    topic = fresh_topic(2)
    dlq = dlq_topic(f"{topic}.dlq", max_message_bytes=100)  # below any dead letter with its headers
    offsets = _send(kafka_bootstrap, topic, [(0, b"[1, 2]"), *_valid(2, 0), *_valid(2, 1)])
    with consumer_thread(_stream(kafka_bootstrap, redis_url, topic, dlq, tmp_path)) as consumer:
        metrics = consumer.metrics
        wait_until(lambda: _offsets(redis_client, topic)[0].get(1) == 1, WAIT_S, "partition 1 to go on")
        time.sleep(HELD_S)
        assert _offsets(redis_client, topic)[0].get(0, -1) == -1
        assert metrics.dlq_held._value.get() == 1
        # the whole letter, then truncated ones down to an empty value: each refused, each counted
        assert metrics.dlq_send_failures._value.get() >= 2
        assert metrics.dead_lettered._value.get() == 0

        admin = _admin(kafka_bootstrap)
        try:
            admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, dlq, configs={"max.message.bytes": "100000"})]
            )
        finally:
            admin.close()
        wait_until(
            lambda: _offsets(redis_client, topic)[0].get(0) == offsets[2],
            WAIT_S,
            "partition 0 to go on once the topic takes the dead letter",
        )
    letters = _letters(kafka_bootstrap, dlq)
    assert len(letters) == 1, [_headers(r) for r in letters]
    headers = _headers(letters[0])
    assert headers["source-offset"] == str(offsets[0]) and "object" in headers["error"]
    assert letters[0].value == b"[1, 2]" and "truncated" not in headers


def test_an_event_from_the_far_future_is_dead_lettered_and_leaves_the_features_alone(
    kafka_bootstrap, redis_url, redis_client, fresh_topic, tmp_path, tmp_path_factory
):
    from feature_store.store import open_store

    topic = fresh_topic(1)
    dlq = fresh_topic(1, name=f"{topic}.dlq")
    now = int(time.time() * 1000)
    before = _event("u1", "i1", "view", now - 60_000)
    future = _event("u1", "i1", "purchase", 253_402_214_400_000)  # 9999-12-31T00:00:00Z
    after = _event("u1", "i1", "add_to_cart", now - 30_000)
    other = _event("u2", "i1", "view", now - 10_000)
    records = [(0, ev.to_json_bytes()) for ev in (before, future, after, other)]
    offsets = _send(kafka_bootstrap, topic, records)
    with consumer_thread(_stream(kafka_bootstrap, redis_url, topic, dlq, tmp_path)):
        wait_until(lambda: _offsets(redis_client, topic)[0] == {0: 3}, WAIT_S, "every record applied")
    (letter,) = _letters(kafka_bootstrap, dlq)
    headers = _headers(letter)
    assert headers["source-offset"] == str(offsets[1])
    assert headers["error"].startswith("ts: ") and "--max-future-skew" in headers["error"], headers
    assert json.loads(letter.value)["event_id"] == future.event_id
    # the features are those of the three other events alone (computed independently)
    assert_features_exact(
        open_store(redis_url, str(tmp_path_factory.mktemp("feast"))), [before, after, other]
    )
