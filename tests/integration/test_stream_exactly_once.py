"""Every valid event is applied exactly once, whatever happens (docs/CONTRACT.md section 4).

Against the real broker and Redis: events are published to a fresh topic, consumed by
``recstack stream`` consumers, and the features read back through Feast's own
``get_online_features`` must equal the ones computed offline from the distinct valid events.
Scenarios: producer duplicates and malformed records; a consumer SIGKILLed mid-stream and
restarted; two consumers in one group, one stopped mid-stream; Redis restarted mid-stream; the
broker restarted mid-stream.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
N_USERS, N_ITEMS = 300, 200
HALF_LIFE_S = 3600.0
KILL_SESSION_TIMEOUT_MS = 6_000  # the broker's minimum: a killed consumer's partitions move sooner
APPLY_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------------------ helpers


@dataclass
class Published:
    """What a test sent: the valid events (duplicates included) and the malformed records."""

    events: list = field(default_factory=list)  # Event, in send order, duplicates included
    malformed: list = field(default_factory=list)  # (partition, offset, expected reason substring)
    last_offsets: dict = field(default_factory=dict)  # partition -> last offset written
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def records(self) -> int:
        return sum(o + 1 for o in self.last_offsets.values())


_MALFORMED = [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "object"),
    (b'{"event_id":"m","item_id":"i","event_type":"view","ts":1}', "user_id"),
    (b'{"event_id":"m","user_id":"u","item_id":"i","event_type":"click","ts":1}', "event_type"),
    (b'{"event_id":"m","user_id":"u","item_id":"i","event_type":"view","ts":"yesterday"}', "ts"),
    (b'{"event_id":"m","user_id":"u","item_id":"i","event_type":"view","ts":1,"price":-1}', "price"),
    (b'{"event_id":"m","user_id":"u","item_id":"i","event_type":"view","ts":1,"quantity":"2"}', "quantity"),
    (b'{"event_id":"","user_id":"u","item_id":"i","event_type":"view","ts":1}', "event_id"),
    (b"\xff\xfe\x00", "UTF-8"),
    (None, "no value"),
    # A lone surrogate escape: once accepted as valid, then the feature write could not encode it.
    (b'{"event_id":"m","user_id":"u\\ud800","item_id":"i","event_type":"view","ts":1}', "user_id"),
]


def _events(n: int, seed: int) -> list:
    from recstack.sources import synthetic
    from services.replay.publisher import frame_to_events

    frame = synthetic(n, n_users=N_USERS, n_items=N_ITEMS, seed=seed)
    frame["event_id"] = frame["event_id"] + f"-{os.getpid()}-{time.monotonic_ns()}"
    return list(frame_to_events(frame))


def publish(
    bootstrap: str,
    topic: str,
    events: list,
    out: Published,
    rate: float | None = None,
    dup_share: float = 0.0,
    bad_share: float = 0.0,
    seed: int = 0,
) -> None:
    """Send ``events`` keyed by user, plus duplicates (same key, same bytes: a producer retry)
    and malformed records; record partitions and offsets in ``out``."""
    from kafka import KafkaProducer

    rnd = random.Random(seed)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, retries=2**31 - 1, request_timeout_ms=15_000
    )
    sends = []
    started = time.monotonic()
    sent = 0
    for ev in events:
        batch = [("valid", ev)]
        if rnd.random() < dup_share:
            batch.append(("valid", ev))
        if rnd.random() < bad_share:
            batch.append(("bad", rnd.choice(_MALFORMED)))
        for kind, payload in batch:
            if kind == "valid":
                future = producer.send(topic, key=payload.user_id.encode(), value=payload.to_json_bytes())
            else:
                future = producer.send(topic, key=b"bad", value=payload[0])
            sends.append((kind, payload, future))
            sent += 1
            if rate and sent % 50 == 0:
                ahead = started + sent / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
    producer.flush(timeout=120)
    for kind, payload, future in sends:
        meta = future.get(timeout=120)
        with out.lock:
            if kind == "valid":
                out.events.append(payload)
            else:
                out.malformed.append((meta.partition, meta.offset, payload[1]))
            out.last_offsets[meta.partition] = max(out.last_offsets.get(meta.partition, -1), meta.offset)
    producer.close()


@contextmanager
def publishing(*args, **kwargs) -> Iterator[threading.Thread]:
    thread = threading.Thread(target=publish, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join(timeout=300)


def _config(kafka_bootstrap: str, redis_url: str, topic: str, event_log: Path, **overrides):
    from services.stream.config import StreamConfig

    return StreamConfig(
        bootstrap=kafka_bootstrap,
        redis=redis_url,
        group=f"g-{topic}",
        topic=topic,
        dlq_topic=f"{topic}.dlq",
        event_log=str(event_log),
        metrics_port=0,
        trending_half_life_s=HALF_LIFE_S,
        log_roll_s=2.0,
        max_batch=500,
        **overrides,
    )


@contextmanager
def consumer_thread(config) -> Iterator:
    import prometheus_client  # noqa: F401  (before Feast: see services/stream/cli.py)

    from services.stream.consumer import StreamConsumer

    consumer = StreamConsumer(config)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run()
        except BaseException as exc:  # surfaced by the test below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield consumer
    finally:
        consumer.stop()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the consumer did not stop within 60 s"
        assert not errors, errors


def consumer_process(config, log_level: str = "WARNING", stderr: Any = None) -> subprocess.Popen:
    """``recstack stream`` as its own process with ``config``'s settings."""
    cmd = [sys.executable, "-m", "recstack.cli", "--log-level", log_level, "stream"]
    for name in (
        "bootstrap",
        "redis",
        "group",
        "topic",
        "dlq_topic",
        "event_log",
        "metrics_port",
        "trending_half_life_s",
        "session_timeout_ms",
        "log_roll_s",
        "max_batch",
    ):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stderr=stderr)


def applied_records(client, topic: str) -> int:
    import redis

    from services.stream.keys import applied_key

    try:
        return sum(int(v) + 1 for v in client.hvals(applied_key(topic)))
    except redis.RedisError:
        return -1


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def wait_all_applied(
    client, topic: str, published: Published, publisher: threading.Thread | None = None
) -> None:
    if publisher is not None:
        publisher.join(timeout=300)
        assert not publisher.is_alive()
    wait_until(
        lambda: applied_records(client, topic) >= published.records,
        APPLY_TIMEOUT_S,
        f"{published.records} records applied",
    )


# ------------------------------------------------------------------------------------ checks


def _expected(events: list) -> tuple[dict, dict]:
    from feature_store.spec import EVENT_WEIGHTS, RECENT_ITEMS_MAX

    seen: set[str] = set()
    users: dict[str, dict] = {}
    items: dict[str, dict] = {}
    for ev in events:  # send order = apply order within a user's partition
        if ev.event_id in seen:
            continue
        seen.add(ev.event_id)
        u = users.setdefault(
            ev.user_id, {"view": 0, "add_to_cart": 0, "purchase": 0, "last": 0, "recent": []}
        )
        u[ev.event_type] += 1
        u["last"] = max(u["last"], ev.ts_ms)
        if ev.item_id in u["recent"]:
            u["recent"].remove(ev.item_id)
        u["recent"].insert(0, ev.item_id)
        it = items.setdefault(ev.item_id, {"view": 0, "add_to_cart": 0, "purchase": 0, "events": []})
        it[ev.event_type] += 1
        it["events"].append((EVENT_WEIGHTS[ev.event_type], ev.ts_ms))
    for u in users.values():
        u["recent"] = u["recent"][:RECENT_ITEMS_MAX]
    for it in items.values():
        ref = max(ts for _, ts in it["events"])
        it["trending"] = sum(w * 2 ** (-(ref - ts) / (HALF_LIFE_S * 1000)) for w, ts in it["events"])
        it["last"] = ref
    return users, items


def assert_features_exact(store, events: list) -> None:
    """Feast's get_online_features equals the features computed offline from the distinct valid events."""
    exp_users, exp_items = _expected(events)
    user_ids = sorted(exp_users)
    got = store.get_online_features(
        features=[
            "user_activity:views",
            "user_activity:add_to_carts",
            "user_activity:purchases",
            "user_activity:last_event_ts",
            "user_activity:recent_items",
        ],
        entity_rows=[{"user_id": u} for u in user_ids],
    ).to_dict()
    for i, user_id in enumerate(user_ids):
        e = exp_users[user_id]
        actual = (got["views"][i], got["add_to_carts"][i], got["purchases"][i], got["last_event_ts"][i])
        assert actual == (e["view"], e["add_to_cart"], e["purchase"], e["last"]), user_id
        assert got["recent_items"][i] == e["recent"], user_id
    item_ids = sorted(exp_items)
    got = store.get_online_features(
        features=[
            "item_popularity:views",
            "item_popularity:add_to_carts",
            "item_popularity:purchases",
            "item_popularity:trending",
            "item_popularity:last_event_ts",
        ],
        entity_rows=[{"item_id": i} for i in item_ids],
    ).to_dict()
    for i, item_id in enumerate(item_ids):
        e = exp_items[item_id]
        actual = (got["views"][i], got["add_to_carts"][i], got["purchases"][i], got["last_event_ts"][i])
        assert actual == (e["view"], e["add_to_cart"], e["purchase"], e["last"]), item_id
        assert math.isclose(got["trending"][i], e["trending"], rel_tol=1e-3), item_id


def logged_event_ids(directory: Path) -> Counter:
    import pyarrow.parquet as pq

    ids: Counter = Counter()
    for path in directory.rglob("*.parquet"):
        assert path.parent.name.startswith("date=")
        ids.update(pq.read_table(path, columns=["event_id"]).column("event_id").to_pylist())
    return ids


def dead_letters(bootstrap: str, dlq_topic: str, expected: int) -> list:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        dlq_topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=5_000,
    )
    out = []
    deadline = time.monotonic() + 60
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1_000).values():
                out.extend(records)
    finally:
        consumer.close()
    return out


@pytest.fixture(scope="module")
def feast_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("feast"))


@pytest.fixture
def topics(fresh_topic):
    def make() -> str:
        topic = fresh_topic(6)
        fresh_topic(1, name=f"{topic}.dlq")
        return topic

    return make


# ------------------------------------------------------------------------------------ scenarios


def test_duplicates_and_malformed_records(
    kafka_bootstrap, redis_url, redis_client, topics, tmp_path, feast_dir
):
    """10% producer duplicates and 2% malformed records: features exact, DLQ exactly the malformed."""
    from feature_store.store import open_store

    topic = topics()
    published = Published()
    publish(kafka_bootstrap, topic, _events(4_000, seed=1), published, dup_share=0.10, bad_share=0.02, seed=1)
    assert len(published.events) > 4_200 and len(published.malformed) > 50
    event_log = tmp_path / "events"
    with consumer_thread(_config(kafka_bootstrap, redis_url, topic, event_log)) as consumer:
        wait_all_applied(redis_client, topic, published)
        metrics = consumer.metrics
    assert_features_exact(open_store(redis_url, feast_dir), published.events)

    distinct = {ev.event_id for ev in published.events}
    assert metrics.applied._value.get() == len(distinct)
    assert metrics.duplicate._value.get() == len(published.events) - len(distinct)
    assert metrics.dead_lettered._value.get() == len(published.malformed)

    letters = dead_letters(kafka_bootstrap, f"{topic}.dlq", len(published.malformed))
    got = {}
    for rec in letters:
        headers = {k: v.decode() for k, v in rec.headers}
        assert headers["source-topic"] == topic
        got[(int(headers["source-partition"]), int(headers["source-offset"]))] = (
            headers["error"],
            rec.key,
            rec.value,
        )
    assert set(got) == {(p, o) for p, o, _ in published.malformed}
    for p, o, reason in published.malformed:
        assert reason in got[(p, o)][0], (reason, got[(p, o)][0])
        assert got[(p, o)][1] == b"bad"

    # graceful stop: the event log holds every distinct valid event exactly once
    assert logged_event_ids(event_log) == Counter(distinct)


def test_consumer_killed_mid_stream_and_restarted(
    kafka_bootstrap, redis_url, redis_client, topics, tmp_path, feast_dir
):
    from feature_store.store import open_store

    topic = topics()
    published = Published()
    event_log = tmp_path / "events"
    config = _config(kafka_bootstrap, redis_url, topic, event_log, session_timeout_ms=KILL_SESSION_TIMEOUT_MS)
    proc = consumer_process(config)
    try:
        events = _events(12_000, seed=2)
        publish(kafka_bootstrap, topic, events[:500], published, dup_share=0.05, seed=2)
        wait_until(
            lambda: applied_records(redis_client, topic) >= published.records, 180, "the consumer to start"
        )
        with publishing(kafka_bootstrap, topic, events[500:], published, rate=1_000, dup_share=0.05) as pub:
            wait_until(
                lambda: applied_records(redis_client, topic) > 3_000, 60, "the consumer to apply events"
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            killed_at = applied_records(redis_client, topic)
            with consumer_thread(config):  # the restart (in this process: Feast is imported already)
                wait_all_applied(redis_client, topic, published, pub)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 0 < killed_at < published.records, "the kill did not land mid-stream"
    assert_features_exact(open_store(redis_url, feast_dir), published.events)
    # nothing lost from the event log; a record may be logged twice only if the kill hit a roll
    logged = logged_event_ids(event_log)
    assert set(logged) == {ev.event_id for ev in published.events}


def test_two_consumers_one_stopped_mid_stream(
    kafka_bootstrap, redis_url, redis_client, topics, tmp_path, feast_dir
):
    from feature_store.store import open_store

    topic = topics()
    published = Published()
    config = _config(kafka_bootstrap, redis_url, topic, tmp_path / "events")
    with consumer_thread(config) as first, consumer_thread(config) as second:
        with publishing(
            kafka_bootstrap, topic, _events(10_000, seed=3), published, rate=1_000, dup_share=0.05
        ) as pub:
            wait_until(
                lambda: first.metrics.applied._value.get() > 0 and second.metrics.applied._value.get() > 0,
                60,
                "both consumers to apply events",
            )
            second.stop()  # leaves the group: its partitions move to the first mid-stream
            wait_all_applied(redis_client, topic, published, pub)
    assert_features_exact(open_store(redis_url, feast_dir), published.events)
    assert set(logged_event_ids(tmp_path / "events")) == {ev.event_id for ev in published.events}


def test_redis_restarted_mid_stream(
    kafka_bootstrap, redis_url, redis_client, topics, tmp_path, feast_dir, infra_control
):
    from feature_store.store import open_store

    topic = topics()
    published = Published()
    with consumer_thread(_config(kafka_bootstrap, redis_url, topic, tmp_path / "events")) as consumer:
        with publishing(
            kafka_bootstrap, topic, _events(10_000, seed=4), published, rate=1_000, dup_share=0.05
        ) as pub:
            wait_until(
                lambda: applied_records(redis_client, topic) > 2_000, 120, "the consumer to apply events"
            )
            infra_control.restart_redis()
            wait_all_applied(redis_client, topic, published, pub)
        assert consumer.metrics.redis_retries._value.get() > 0, "the restart went unnoticed"
    assert_features_exact(open_store(redis_url, feast_dir), published.events)


def test_broker_restarted_mid_stream(
    kafka_bootstrap, redis_url, redis_client, topics, tmp_path, feast_dir, infra_control
):
    from feature_store.store import open_store

    topic = topics()
    published = Published()
    with consumer_thread(_config(kafka_bootstrap, redis_url, topic, tmp_path / "events")):
        with publishing(
            kafka_bootstrap, topic, _events(8_000, seed=5), published, rate=800, dup_share=0.05
        ) as pub:
            wait_until(
                lambda: applied_records(redis_client, topic) > 1_500, 120, "the consumer to apply events"
            )
            infra_control.restart_kafka()
            wait_all_applied(redis_client, topic, published, pub)
    assert_features_exact(open_store(redis_url, feast_dir), published.events)
