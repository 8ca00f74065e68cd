"""The event log holds every applied event exactly once across stalls, crashes mid-roll and a
failing disk, and memory stays bounded while the disk is away (docs/FEATURES.md, "The event log").

Against the real Redis (and the real broker where a consumer group is involved):

* a consumer that no longer owns a partition cannot make that partition's events part of the log:
  the race found by the fault runs (a stalled consumer rolls on waking, before it hears that its
  partitions moved) replayed step by step, then for real with SIGSTOP/SIGCONT;
* a writer killed between staging a roll and recording it, or between recording it and renaming
  its files, leaves files that the next start publishes or removes as Redis says;
* with the event-log folder failing, consuming pauses at ``--eventlog-max-unwritten`` and resumes
  once the folder is back, with the log complete and the features exact.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from test_stream_exactly_once import (
    REPO_ROOT,
    Published,
    _config,
    _events,
    applied_records,
    assert_features_exact,
    consumer_process,
    consumer_thread,
    logged_event_ids,
    publish,
    publishing,
    wait_all_applied,
    wait_until,
)

pytestmark = pytest.mark.integration

STALL_SESSION_TIMEOUT_MS = 6_000  # the broker's minimum: the stalled consumer is dropped sooner


def _offline_consumer(redis_url: str, event_log: Path, topic: str):
    """A consumer whose Kafka side is never started: the event log's steps are driven by hand."""
    import prometheus_client  # noqa: F401  (before Feast: see services/stream/cli.py)

    from services.stream.config import StreamConfig
    from services.stream.consumer import StreamConsumer

    config = StreamConfig(redis=redis_url, topic=topic, event_log=str(event_log), metrics_port=0)
    return StreamConsumer(config)


def _close(consumer) -> None:
    consumer._executor.shutdown()
    consumer._log_executor.shutdown()
    consumer._event_log.close()
    consumer._redis.close()


def _buffer(consumer, partition: int, events: list, first_offset: int = 0) -> None:
    """As if the consumer had applied these records of ``partition`` and buffered their events."""
    consumer._event_log.append(events, partition)
    consumer._position[partition] = first_offset + len(events)


def _logged(client, topic: str) -> dict[int, int]:
    from services.stream.keys import logged_key

    return {int(p): int(o) for p, o in client.hgetall(logged_key(topic)).items()}


def test_a_roll_recorded_after_its_partition_moved_is_refused_and_leaves_no_file(
    redis_url, redis_client, tmp_path
):
    """The race of the fault runs, step by step: a consumer stalls with events buffered, one of its
    partitions goes to another consumer which logs it, and the first one wakes with its roll due
    before it hears of the move. Its roll must not log that partition's events a second time."""
    from services.stream.keys import log_rolls_key

    topic = f"fence-{uuid.uuid4().hex[:8]}"
    event_log = tmp_path / "events"
    events = _events(40, seed=11)
    p0, p1 = events[:20], events[20:]
    old = _offline_consumer(redis_url, event_log, topic)
    new = _offline_consumer(redis_url, event_log, topic)
    try:
        old._take_partitions([0, 1])
        _buffer(old, 0, p0)
        _buffer(old, 1, p1)
        # old stalls; the group gives partition 1 to new, which reads it from the logged offset
        # (nothing logged yet), applies nothing (the features fence) but logs what old applied
        _, logged = new._take_partitions([1])
        assert logged == {1: -1}
        _buffer(new, 1, p1)
        new._roll(main_thread=True)
        assert _logged(redis_client, topic) == {1: 19}

        old._roll(main_thread=True)  # wakes, roll due, still believes it owns both partitions
        assert not list(event_log.rglob("*.tmp")), "the refused roll's files are deleted"
        assert old.metrics.log_refused._value.get() == len(p1)
        assert set(old._tokens) == {0}
        assert old._event_log.rows == len(p0), "partition 0's events are kept for the next roll"

        old._roll(main_thread=True)  # partition 0 is still old's: logged now
        assert _logged(redis_client, topic) == {0: 19, 1: 19}
        assert logged_event_ids(event_log) == Counter(ev.event_id for ev in events)

        # The other order: a roll recorded before the move counts, and the next owner starts after it.
        _buffer(old, 0, _events(5, seed=12), first_offset=20)
        old._roll(main_thread=True)
        _, logged = new._take_partitions([0])
        assert logged == {0: 24}
        assert not redis_client.hlen(log_rolls_key(topic)), "records of renamed files are dropped"
    finally:
        _close(old)
        _close(new)


_CRASH = """
import json, os, signal, sys
import prometheus_client  # noqa: F401
from recstack.events import Event
from services.stream.config import StreamConfig
from services.stream.consumer import StreamConsumer

cfg = json.loads(sys.argv[1])
config = StreamConfig(redis=cfg["redis"], topic=cfg["topic"], event_log=cfg["event_log"], metrics_port=0)
events = {p: [Event(e[0], e[1], e[2], e[3], e[4]) for e in evs] for p, evs in cfg["events"].items()}
staged_only, recorded = StreamConsumer(config), StreamConsumer(config)
staged_only._take_partitions([0])
staged_only._event_log.append(events["0"], 0)
staged_only._position[0] = len(events["0"])
recorded._take_partitions([1])
recorded._event_log.append(events["1"], 1)
recorded._position[1] = len(events["1"])

staged_only._start_roll()
staged_only._rolling.future.result()  # staged under temporary names; its record never happens

def die(staged):  # between recording the roll in Redis and renaming its files
    os.kill(os.getpid(), signal.SIGKILL)

recorded._event_log.publish = die
recorded._roll(main_thread=True)
sys.exit("not killed")
"""


def test_a_writer_killed_mid_roll_leaves_files_the_next_start_publishes_or_removes(
    redis_url, redis_client, tmp_path
):
    """SIGKILL with one roll staged but not recorded (partition 0) and another recorded but not
    renamed (partition 1): the next start removes the first (partition 0 is read again from its
    logged offset) and publishes the second (its logged offset was raised with it)."""
    from services.stream.keys import log_rolls_key

    topic = f"crash-{uuid.uuid4().hex[:8]}"
    event_log = tmp_path / "events"
    events = _events(30, seed=13)
    by_partition = {"0": events[:10], "1": events[10:]}
    cfg = {
        "redis": redis_url,
        "topic": topic,
        "event_log": str(event_log),
        "events": {
            p: [[e.event_id, e.user_id, e.item_id, e.event_type, e.ts_ms] for e in evs]
            for p, evs in by_partition.items()
        },
    }
    child = subprocess.run(
        [sys.executable, "-c", _CRASH, json.dumps(cfg)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    leftovers = sorted(event_log.rglob(".part-*.parquet.tmp"))
    assert len(leftovers) == 2 and not list(event_log.rglob("*.parquet"))
    assert len(list(event_log.glob(".writer-*.lock"))) == 2  # released by the kernel, still there
    assert _logged(redis_client, topic) == {1: 19}
    assert redis_client.hlen(log_rolls_key(topic)) == 1

    starting = _offline_consumer(redis_url, event_log, topic)
    try:
        starting._resolve_leftovers()  # what run() does first
        assert not list(event_log.rglob("*.tmp"))
        assert logged_event_ids(event_log) == Counter(ev.event_id for ev in by_partition["1"])
        assert not redis_client.hlen(log_rolls_key(topic))
        assert [p.name for p in event_log.glob(".writer-*.lock")] == [
            f".writer-{starting._event_log._writer_id}.lock"
        ]
        # partition 0's next owner reads it from the start and logs it; partition 1 after offset 19
        _, logged = starting._take_partitions([0, 1])
        assert logged == {0: -1, 1: 19}
    finally:
        _close(starting)


def test_a_consumer_stalled_past_its_session_logs_nothing_twice(
    kafka_bootstrap, redis_url, redis_client, fresh_topic, tmp_path, feast_dir
):
    """SIGSTOP one of two consumers past its session timeout while events flow, then SIGCONT it
    with its roll long due: the event log holds every event exactly once."""
    from feature_store.store import open_store

    topic = fresh_topic(6)
    fresh_topic(1, name=f"{topic}.dlq")
    published = Published()
    event_log = tmp_path / "events"
    config = dataclasses.replace(
        _config(kafka_bootstrap, redis_url, topic, event_log, session_timeout_ms=STALL_SESSION_TIMEOUT_MS),
        log_roll_s=1.0,
        max_batch=500,
    )
    stderr = tmp_path / "stalled.log"
    with open(stderr, "w") as err:
        stalled = consumer_process(config, log_level="INFO", stderr=err)
    try:
        events = _events(14_000, seed=14)
        with consumer_thread(config) as other:
            with publishing(kafka_bootstrap, topic, events, published, rate=700, dup_share=0.05) as pub:
                # Both hold partitions: the thread has given some up, and the process says it took
                # some (the thread's side alone is true while the process is still joining).
                wait_until(
                    lambda: (
                        applied_records(redis_client, topic) > 0
                        and 0 < len(other._tokens) < 6
                        and re.search(r"assigned partitions \[\d", stderr.read_text()) is not None
                    ),
                    180,
                    "both consumers to share the partitions",
                )
                wait_until(
                    lambda: applied_records(redis_client, topic) > 3_000, 120, "events to flow through both"
                )
                stalled.send_signal(signal.SIGSTOP)
                wait_until(lambda: len(other._tokens) == 6, 120, "the other consumer to take every partition")
                time.sleep(2.0)  # the other consumer rolls what it took over; the stalled one's roll is due
                stalled.send_signal(signal.SIGCONT)
                wait_all_applied(redis_client, topic, published, pub)
            stalled.send_signal(signal.SIGTERM)
            assert stalled.wait(timeout=60) == 0
    finally:
        if stalled.poll() is None:
            stalled.kill()
    assert_features_exact(open_store(redis_url, feast_dir), published.events)
    distinct = {ev.event_id for ev in published.events}
    logged = logged_event_ids(event_log)
    twice = {k: n for k, n in logged.items() if n > 1}
    assert not twice, f"{len(twice)} events logged more than once"
    assert set(logged) == distinct
    said = stderr.read_text()
    assert "moved to another consumer" in said or "are left to their new owner" in said, said[-3000:]


def test_a_failing_event_log_pauses_consuming_at_the_limit_and_loses_nothing(
    kafka_bootstrap, redis_url, redis_client, fresh_topic, tmp_path, feast_dir
):
    """The event-log folder fails (a file where it was: every write fails, as on a full or
    read-only disk): the consumer stops at --eventlog-max-unwritten events in memory with its
    partitions paused, then resumes once the folder is back; every event is logged exactly once."""
    from feature_store.store import open_store

    topic = fresh_topic(6)
    fresh_topic(1, name=f"{topic}.dlq")
    published = Published()
    event_log = tmp_path / "events"
    away = tmp_path / "events-away"
    limit, max_batch = 1_500, 200
    settings = {"log_roll_rows": 500, "eventlog_max_unwritten": limit}
    config = dataclasses.replace(
        _config(kafka_bootstrap, redis_url, topic, event_log, **settings),
        log_roll_s=1.0,
        max_batch=max_batch,
    )
    events = _events(6_000, seed=15)
    with consumer_thread(config) as consumer:
        metrics = consumer.metrics
        publish(kafka_bootstrap, topic, events[:1_000], published, dup_share=0.05, seed=15)
        wait_all_applied(redis_client, topic, published)
        wait_until(lambda: logged_event_ids(event_log), 30, "a first roll")

        event_log.rename(away)  # the folder fails: writes under it raise NotADirectoryError
        event_log.write_bytes(b"")
        publish(kafka_bootstrap, topic, events[1_000:], published, dup_share=0.05, seed=16)
        wait_until(lambda: metrics.paused._value.get() == 1, 120, "consuming to pause at the limit")
        # the batch in flight when it paused is the last one: no other starts while paused
        wait_until(lambda: consumer._inflight is None, 60, "the last batch to be applied")
        at_pause = applied_records(redis_client, topic)
        waiting = metrics.log_unwritten._value.get()
        failures = metrics.log_write_failures._value.get()
        for _ in range(30):  # roll retries meanwhile: nothing more is consumed or held
            assert metrics.paused._value.get() == 1
            assert metrics.log_unwritten._value.get() == waiting
            time.sleep(0.1)
        assert applied_records(redis_client, topic) == at_pause < published.records
        # at most the batch that crossed the limit and the one in flight beyond it
        assert limit <= waiting < limit + 2 * max_batch, waiting
        wait_until(
            lambda: metrics.log_write_failures._value.get() > failures, 60, "the roll to be tried again"
        )
        assert metrics.log_unwritten._value.get() == waiting

        event_log.unlink()  # the disk is back
        away.rename(event_log)
        wait_all_applied(redis_client, topic, published)
        wait_until(lambda: metrics.paused._value.get() == 0, 60, "consuming to resume")
    assert_features_exact(open_store(redis_url, feast_dir), published.events)
    assert logged_event_ids(event_log) == Counter({ev.event_id for ev in published.events})


@pytest.fixture(scope="module")
def feast_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("feast"))
