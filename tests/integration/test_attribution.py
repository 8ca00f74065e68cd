"""The attribution consumer against real Kafka and Redis: per-arm counters equal the offline join
of the same topics and the hand-computed ones, with an event read before its impression; and
still equal after the consumer is SIGKILLed mid-stream and restarted (exactly once)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

from kafka import KafkaProducer

from recstack.events import Event
from services.attribution import keys
from services.attribution.config import AttributionConfig
from services.attribution.consumer import AttributionConsumer
from services.attribution.metrics import AttributionMetrics
from services.attribution.store import offline_join_topics, rates, read_arm_metrics, topic_records

T = 1_700_000_000_000
MIN = 60_000


def impression(rid, user, items, ts, arm="A", shadow=None):
    value = {"request_id": rid, "user_id": user, "arm": arm, "model_version": f"v-{arm}", "ts": ts}
    value["items"] = [{"item_id": it, "position": k, "score": 1.0 / k} for k, it in enumerate(items, 1)]
    if shadow:
        value["shadow"] = {
            "version": "s1",
            "items": [{"item_id": it, "position": k} for k, it in enumerate(shadow, 1)],
        }
    return json.dumps(value).encode()


def event(eid, user, item, kind, ts, request_id=None, price=None):
    return Event(eid, user, item, kind, ts, price=price, quantity=2 if price else 1, request_id=request_id)


def publish(bootstrap, topic, records):
    """``records``: (user_id, value bytes); keyed by user_id, as the server and the storefront do."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for user, value in records:
        producer.send(topic, key=user.encode(), value=value)
    producer.flush()
    producer.close()


def wait_applied(client, bootstrap, imp_topic, ev_topic, timeout=90.0):
    """Until Redis holds both topics' last offsets as applied."""
    want = {keys.impressions_field(p): o for p, o, _ in topic_records(bootstrap, imp_topic)}
    want |= {keys.events_field(p): o for p, o, _ in topic_records(bootstrap, ev_topic)}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stored = client.hmget(keys.OFFSETS, list(want))
        if all(v is not None and int(v) == want[f] for f, v in zip(want, stored, strict=True)):
            return
        time.sleep(0.2)
    raise AssertionError(f"not applied in {timeout}s: want {want}, have {stored}")


def offline(bootstrap, imp_topic, ev_topic, window_ms=30 * MIN):
    return offline_join_topics(bootstrap, imp_topic, ev_topic, window_ms)


def _config(bootstrap, redis_url, imp_topic, ev_topic, **more):
    return AttributionConfig(
        bootstrap=bootstrap,
        redis=redis_url,
        group=f"attr-{imp_topic}",
        impressions_topic=imp_topic,
        events_topic=ev_topic,
        lateness_s=1.0,
        metrics_port=0,
        session_timeout_ms=6_000,
        **more,
    )


def test_counters_equal_the_offline_join_and_the_hand_count(
    kafka_bootstrap, fresh_topic, redis_url, redis_client
):
    imp_topic, ev_topic = fresh_topic(3), fresh_topic(3)
    config = _config(kafka_bootstrap, redis_url, imp_topic, ev_topic, max_wait_s=60.0)
    # max_wait 60 s: no event is released by waiting, only by the impressions' watermark
    metrics = AttributionMetrics()
    consumer = AttributionConsumer(config, metrics)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        # u2's add-to-cart arrives before the impression it belongs to: held until impressions pass its ts.
        publish(
            kafka_bootstrap,
            ev_topic,
            [("u2", event("e5", "u2", "y", "add_to_cart", T + 20_000).to_json_bytes())],
        )
        deadline = time.monotonic() + 60
        while metrics.held._value.get() < 1:
            assert time.monotonic() < deadline, "the event was never held"
            time.sleep(0.1)
        publish(
            kafka_bootstrap,
            imp_topic,
            [
                ("u1", impression("r1", "u1", ["a", "b", "c"], T)),
                ("u2", impression("r3", "u2", ["x", "y"], T + 10_000)),
                ("u1", impression("r2", "u1", ["c", "a"], T + MIN, arm="B", shadow=["a", "c"])),
                ("u2", impression("r4", "u2", ["z"], T + 40 * MIN)),  # moves u2's watermark on
                ("u1", impression("r5", "u1", ["q"], T + 50 * MIN)),  # and u1's
            ],
        )
        publish(
            kafka_bootstrap,
            ev_topic,
            [
                ("u1", event("e1", "u1", "a", "purchase", T + 2 * MIN, price=10.0).to_json_bytes()),  # r2, B
                ("u1", event("e2", "u1", "b", "add_to_cart", T + 2 * MIN).to_json_bytes()),  # r1, A
                ("u1", event("e3", "u1", "a", "view", T + 200_000, request_id="r1").to_json_bytes()),  # r1
                ("u2", event("e4", "u2", "x", "purchase", T + 10_000 + 31 * MIN).to_json_bytes()),  # too late
                ("u1", event("e6", "u1", "a", "purchase", T + 3 * MIN, request_id="nope").to_json_bytes()),
            ],
        )
        wait_applied(redis_client, kafka_bootstrap, imp_topic, ev_topic)
        # An invalid impression, alone: skipped, and its offset applied all the same.
        publish(kafka_bootstrap, imp_topic, [("u1", b"{not an impression")])
        wait_applied(redis_client, kafka_bootstrap, imp_topic, ev_topic, timeout=20)
    finally:
        consumer.stop()
        thread.join(30)
    online = read_arm_metrics(redis_client)
    assert online == offline(kafka_bootstrap, imp_topic, ev_topic)
    arms = {arm: m["totals"] for arm, m in online["default"].items()}
    assert arms == {
        "A": {
            "impressions": 4,
            "add_to_cart": 2,
            "rr_micros_add_to_cart": 1_000_000,
            "view": 1,
            "rr_micros_view": 1_000_000,
        },
        "B": {
            "impressions": 1,
            "purchase": 1,
            "rr_micros_purchase": 500_000,
            "revenue_micros": 20_000_000,
            "priced": 1,
        },
        "shadow:s1": {
            "impressions": 1,
            "purchase": 1,
            "rr_micros_purchase": 1_000_000,
            "live_rr_micros_purchase": 500_000,
        },
    }
    assert online["default"]["A"]["buckets"][T // MIN] == {
        "impressions": 2,
        "add_to_cart": 1,
        "rr_micros_add_to_cart": 500_000,
    }
    assert metrics.unattributed.labels("no_impression")._value.get() == 1
    assert metrics.unattributed.labels("unknown_request_id")._value.get() == 1
    assert metrics.invalid.labels(imp_topic)._value.get() == 1
    # The per-user state is bounded and expires.
    assert redis_client.llen(keys.user_key("u1")) == 3
    assert 0 < redis_client.pttl(keys.user_key("u1")) <= config.state_ttl_s * 1000
    assert rates(arms["B"])["purchase_rate"] == 1.0 and rates(arms["B"])["revenue_per_impression"] == 20.0


def _traffic(seed, n_users=40, n_imps=1500):
    """Impressions in ts order and events following them (some with request_id, some past the
    window, some for items never shown), each event published a little before or after."""
    rng = random.Random(seed)
    imps, events = [], []
    for k in range(n_imps):
        user, ts = f"u{rng.randrange(n_users)}", T + k * 3_000
        items = rng.sample([f"i{j}" for j in range(30)], 8)
        arm = rng.choice("AB")
        imps.append(
            (ts, user, impression(f"r{k}", user, items, ts, arm, shadow=items[::-1] if arm == "A" else None))
        )
        for j in range(rng.choice((0, 1, 1, 2))):
            kind = rng.choice(("view", "add_to_cart", "purchase"))
            item = rng.choice(items) if rng.random() < 0.9 else "i-unseen"
            later = rng.choice((1_000, 60_000, 20 * MIN, 40 * MIN))
            rid = f"r{k}" if rng.random() < 0.3 else None
            e = event(f"e{k}-{j}", user, item, kind, ts + later, rid, price=rng.choice((None, 3.5)))
            events.append((ts + later + rng.randrange(-30_000, 30_000), user, e.to_json_bytes()))
    return imps, sorted(events)


def _start(config_args):
    return subprocess.Popen(
        [sys.executable, "-m", "recstack.cli", "attribute", *config_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_sigkill_and_restart_still_equal_the_offline_join(
    kafka_bootstrap, fresh_topic, redis_url, redis_client
):
    imp_topic, ev_topic = fresh_topic(3), fresh_topic(3)
    imps, events = _traffic(seed=16)
    half_i, half_e = len(imps) // 2, len(events) // 2
    publish(kafka_bootstrap, imp_topic, [(u, v) for _, u, v in imps[:half_i]])
    publish(kafka_bootstrap, ev_topic, [(u, v) for _, u, v in events[:half_e]])
    args = [
        f"--bootstrap={kafka_bootstrap}",
        f"--redis={redis_url}",
        f"--group=attr-{imp_topic}",
        f"--impressions-topic={imp_topic}",
        f"--events-topic={ev_topic}",
        "--max-batch=40",  # many small batches: the kill lands between two of them
        "--max-wait=5s",
        "--lateness=1s",
        "--metrics-port=0",
        "--session-timeout-ms=6000",
    ]
    first = _start(args)
    try:
        deadline = time.monotonic() + 60
        while not any(int(v) > 100 for v in redis_client.hvals(keys.OFFSETS) or [b"0"]):
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        publish(kafka_bootstrap, ev_topic, [(u, v) for _, u, v in events[half_e:]])  # events first
        second = _start(args)
        try:
            publish(kafka_bootstrap, imp_topic, [(u, v) for _, u, v in imps[half_i:]])
            wait_applied(redis_client, kafka_bootstrap, imp_topic, ev_topic, timeout=120)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0
    finally:
        if first.poll() is None:
            first.kill()
    online = read_arm_metrics(redis_client)
    expected = offline(kafka_bootstrap, imp_topic, ev_topic)
    assert online == expected
    totals = expected["default"]
    assert totals["A"]["totals"]["impressions"] + totals["B"]["totals"]["impressions"] == len(imps)
    assert sum(t["totals"].get("purchase", 0) for t in totals.values()) > 50  # something was attributed


def test_writes_lost_by_redis_are_applied_again(kafka_bootstrap, fresh_topic, redis_url, redis_client):
    """Redis comes back with older data (a restart from an old AOF or RDB file): offsets and
    counters went back together; the consumer sees its offsets behind and reads that range again."""
    imp_topic, ev_topic = fresh_topic(2), fresh_topic(2)
    imps, events = _traffic(seed=7, n_users=10, n_imps=300)
    metrics = AttributionMetrics()
    consumer = AttributionConsumer(
        _config(kafka_bootstrap, redis_url, imp_topic, ev_topic, max_wait_s=2.0), metrics
    )
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        publish(kafka_bootstrap, imp_topic, [(u, v) for _, u, v in imps[:150]])
        publish(kafka_bootstrap, ev_topic, [(u, v) for ts, u, v in events if ts < imps[150][0]])
        wait_applied(redis_client, kafka_bootstrap, imp_topic, ev_topic)
        snapshot = {
            k: (redis_client.dump(k), redis_client.pttl(k)) for k in redis_client.scan_iter(keys.PREFIX + "*")
        }
        publish(kafka_bootstrap, imp_topic, [(u, v) for _, u, v in imps[150:]])
        publish(kafka_bootstrap, ev_topic, [(u, v) for ts, u, v in events if ts >= imps[150][0]])
        wait_applied(redis_client, kafka_bootstrap, imp_topic, ev_topic)
        before = read_arm_metrics(redis_client)
        pipe = redis_client.pipeline(transaction=True)
        pipe.delete(*redis_client.scan_iter(keys.PREFIX + "*"))
        for key, (value, ttl) in snapshot.items():
            pipe.restore(key, max(ttl, 0), value)
        pipe.execute()
        assert read_arm_metrics(redis_client) != before  # writes lost
        wait_applied(redis_client, kafka_bootstrap, imp_topic, ev_topic)
    finally:
        consumer.stop()
        thread.join(30)
    assert metrics.fence_rewinds._value.get() >= 1
    assert read_arm_metrics(redis_client) == before == offline(kafka_bootstrap, imp_topic, ev_topic)


def _in_thread(config):
    metrics = AttributionMetrics()
    consumer = AttributionConsumer(config, metrics)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    return consumer, thread, metrics


def test_a_stale_owner_is_refused_and_a_second_member_shares_the_work(
    kafka_bootstrap, fresh_topic, redis_url, redis_client
):
    """Partition tokens: once another consumer has taken the partitions (here: their tokens
    replaced), the old owner's batches are refused and change nothing. Then two members split
    the partitions (partition p of both topics to one member) and the totals equal the offline join."""
    imp_topic, ev_topic = fresh_topic(4), fresh_topic(4)
    imps, events = _traffic(seed=3, n_users=12, n_imps=200)
    config = _config(kafka_bootstrap, redis_url, imp_topic, ev_topic, max_wait_s=2.0)
    first, first_thread, first_metrics = _in_thread(config)
    second = None
    try:
        publish(kafka_bootstrap, imp_topic, [(u, v) for _, u, v in imps[:100]])
        publish(kafka_bootstrap, ev_topic, [(u, v) for ts, u, v in events if ts < imps[100][0]])
        wait_applied(redis_client, kafka_bootstrap, imp_topic, ev_topic)
        owners = redis_client.hgetall(keys.OWNERS)
        redis_client.hset(keys.OWNERS, mapping={f: b"someone-else" for f in owners})
        before = (read_arm_metrics(redis_client), redis_client.hgetall(keys.OFFSETS))
        publish(kafka_bootstrap, imp_topic, [(u, v) for _, u, v in imps[100:]])
        stored = {k.decode(): int(v) for k, v in before[1].items()}
        fed = {p for p, o, _ in topic_records(kafka_bootstrap, imp_topic) if o > stored.get(f"imp:{p}", -1)}
        assert fed
        deadline = time.monotonic() + 30
        while fed & first._parts.keys():  # each fed partition's next batch is refused: it leaves them
            assert time.monotonic() < deadline, "the stale owner kept writing"
            time.sleep(0.1)
        assert (read_arm_metrics(redis_client), redis_client.hgetall(keys.OFFSETS)) == before
        first.stop()
        first_thread.join(30)
        # A fresh group of two members takes over (their tokens replace the stale ones).
        first, first_thread, first_metrics = _in_thread(config)
        second = _in_thread(config)
        # Joining waits for the group's rebalance (the stopped member may still count until its
        # session ends): minutes on a loaded machine, so only a long wait means it never happens.
        deadline = time.monotonic() + 180
        while not (first._parts and second[0]._parts):  # both members hold partitions of both topics
            assert time.monotonic() < deadline, "the second member never got partitions"
            time.sleep(0.1)
        assert not first._parts.keys() & second[0]._parts.keys()
        publish(kafka_bootstrap, ev_topic, [(u, v) for ts, u, v in events if ts >= imps[100][0]])
        wait_applied(redis_client, kafka_bootstrap, imp_topic, ev_topic)
    finally:
        for consumer, thread in ((first, first_thread), (second[0], second[1]) if second else (None, None)):
            if consumer is not None:
                consumer.stop()
                thread.join(30)
    assert read_arm_metrics(redis_client) == offline(kafka_bootstrap, imp_topic, ev_topic)
    assert set(redis_client.hvals(keys.OWNERS)) != {b"someone-else"}
