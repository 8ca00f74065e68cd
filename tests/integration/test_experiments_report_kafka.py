"""``recstack experiment report`` against the real broker and Redis: simulated A/B traffic and a
hand-computed case published to fresh topics, the real attribution consumer filling Redis, then
the report as a function and through the CLI (verdict, figures, the consumer's totals agreeing,
the PNG); A/A traffic says "no difference yet"; an unknown experiment and an unreachable broker
are refused naming the argument."""

from __future__ import annotations

import json
import threading
import time

import pytest
from kafka import KafkaProducer

from recstack.cli import main as recstack
from recstack.errors import UserError
from recstack.experiments import report as R
from recstack.experiments.simulate import Storefront, cooccurrence_ranker, popularity_ranker, simulate
from recstack.redis_url import connect
from services.attribution import keys
from services.attribution.config import AttributionConfig
from services.attribution.consumer import AttributionConsumer
from services.attribution.metrics import AttributionMetrics
from services.attribution.store import topic_records

pytestmark = pytest.mark.integration

T = 1_800_000_000_000  # the hand case, days after the simulation's start
MIN = 60_000


def _publish(bootstrap, topic, records, partitions=0):
    """Keyed by user, as the servers and the storefront publish. ``partitions``: then one impression
    a day later on each partition, so the consumer's impression watermark passes every event and
    releases it (no event waits for --max-wait, which a backlog read would outrun)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    for value in records:
        producer.send(topic, key=json.loads(value)["user_id"].encode(), value=value)
    for p in range(partitions):
        tail = {"request_id": f"tail-{p}", "user_id": "tail", "experiment": "tail", "arm": "T"}
        tail |= {"ts": T + 86_400_000, "items": []}
        producer.send(topic, key=b"tail", value=json.dumps(tail).encode(), partition=p)
    producer.flush()
    producer.close()


def _hand():
    def imp(rid, user, items, ts, arm):
        value = {"request_id": rid, "user_id": user, "experiment": "hand", "arm": arm, "model_version": "v"}
        return json.dumps(
            value | {"ts": ts, "items": [{"item_id": i, "position": k} for k, i in enumerate(items, 1)]}
        )

    def ev(eid, user, item, kind, ts, price=None):
        return json.dumps(
            {"event_id": eid, "user_id": user, "item_id": item, "event_type": kind, "ts": ts, "price": price}
        )

    imps = [
        imp("h-r1", "h1", ["a", "b"], T, "A"),
        imp("h-r2", "h2", ["a"], T, "A"),
        imp("h-r3", "h3", ["x"], T, "B"),
    ]
    events = [
        ev("h-e1", "h1", "b", "add_to_cart", T + MIN),  # h-r1, position 1: 1/2
        ev("h-e2", "h1", "b", "purchase", T + 2 * MIN, price=4.5),  # h-r1, revenue 4.5
        ev("h-e3", "h3", "x", "purchase", T + MIN),  # h-r3
    ]
    return [s.encode() for s in imps], [s.encode() for s in events]


def _wait_applied(client, bootstrap, imp_topic, ev_topic, timeout=240.0):
    want = {keys.impressions_field(p): o for p, o, _ in topic_records(bootstrap, imp_topic)}
    want |= {keys.events_field(p): o for p, o, _ in topic_records(bootstrap, ev_topic)}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stored = client.hmget(keys.OFFSETS, list(want))
        if all(v is not None and int(v) >= want[f] for f, v in zip(want, stored, strict=True)):
            return
        time.sleep(0.2)
    raise AssertionError(f"the attribution consumer did not catch up in {timeout}s")


@pytest.fixture(scope="module")
def world():
    shop = Storefront(seed=0)
    history = shop.history()
    return shop, cooccurrence_ranker(shop, history), popularity_ranker(shop, history)


def test_report_from_the_topics_names_the_winner_and_agrees_with_the_consumer(
    kafka_bootstrap, fresh_topic, redis_url, redis_client, tmp_path, capsys, world
):
    shop, trained, popular = world
    imp_topic, ev_topic = fresh_topic(3), fresh_topic(3)
    sim = simulate({"A": trained, "B": popular}, 6_000, 0, shop)
    hand_imps, hand_events = _hand()
    _publish(
        kafka_bootstrap,
        imp_topic,
        [*sim.impression_values("ab", {"A": "v-trained", "B": "v-pop"}), *hand_imps],
        partitions=3,
    )
    _publish(kafka_bootstrap, ev_topic, [*(e.to_json_bytes() for e in sim.events()), *hand_events])

    config = AttributionConfig(
        bootstrap=kafka_bootstrap,
        redis=redis_url,
        group=f"attr-{imp_topic}",
        impressions_topic=imp_topic,
        events_topic=ev_topic,
        max_wait_s=120.0,  # events are released by the impressions' watermark only
        metrics_port=0,
        session_timeout_ms=6_000,
    )
    consumer = AttributionConsumer(config, AttributionMetrics())
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        _wait_applied(redis_client, kafka_bootstrap, imp_topic, ev_topic)
    finally:
        consumer.stop()
        thread.join(30)

    options = {
        "impressions_topic": imp_topic,
        "events_topic": ev_topic,
        "redis_client": lambda: connect(redis_url),
    }
    # --- as a function ------------------------------------------------------------------------------
    rep = R.run(kafka_bootstrap, experiment="ab", out_dir=tmp_path / "ab", progress=False, **options)
    assert rep.verdict == "A wins" and rep.pair == ("A", "B")
    assert rep.consumer is not None and rep.differences == []  # the consumer caught up: equal
    assert rep.arms["A"].impressions + rep.arms["B"].impressions == 6_000
    assert rep.plot == tmp_path / "ab" / "purchase.png" and rep.plot.stat().st_size > 10_000

    hand = R.run(kafka_bootstrap, experiment="hand", out_dir=tmp_path / "hand", progress=False, **options)
    a, b = hand.arms["A"], hand.arms["B"]
    assert (a.impressions, a.users, b.impressions, b.users) == (2, 2, 1, 1)
    assert a.moments["add_to_cart"].mean == 0.5 and a.moments["purchase"].mean == 0.5
    assert a.moments["reciprocal_rank"].mean == 0.25  # (1/2 + 0) / 2
    assert a.moments["revenue"].mean == 2.25  # 4.5 / 2
    assert b.moments["purchase"].mean == 1.0 and b.moments["add_to_cart"].mean == 0.0
    assert hand.differences == []
    assert hand.verdict.startswith("no difference yet — too little data")

    # --- through the CLI ----------------------------------------------------------------------------
    out = tmp_path / "cli"
    argv = [
        "experiment",
        "report",
        "--experiment",
        "ab",
        "--bootstrap",
        kafka_bootstrap,
        "--redis",
        redis_url,
    ]
    argv += [
        "--impressions-topic",
        imp_topic,
        "--events-topic",
        ev_topic,
        "--out",
        str(out),
        "--metric",
        "mrr",
    ]
    assert recstack(argv) == 0
    printed = capsys.readouterr().out
    assert "arm A: 3," in printed and "every counter agrees" in printed
    assert "verdict (reciprocal_rank): A wins" in printed
    assert (out / "mrr.png").stat().st_size > 10_000

    # --- refused, naming the argument ----------------------------------------------------------------
    with pytest.raises(UserError, match=r"--experiment 'nope': no impressions of it .*ab \(6,000\)"):
        R.run(kafka_bootstrap, experiment="nope", out_dir=tmp_path, progress=False, **options)
    assert recstack([*argv[:3], "nope", *argv[4:]]) == 2
    assert "--experiment 'nope'" in capsys.readouterr().err


def test_a_a_traffic_is_no_difference_yet_and_a_dead_broker_is_named(
    kafka_bootstrap, fresh_topic, tmp_path, world
):
    shop, trained, _ = world
    imp_topic, ev_topic = fresh_topic(3), fresh_topic(3)
    sim = simulate({"A": trained, "B": trained}, 6_000, 7, shop)
    _publish(kafka_bootstrap, imp_topic, list(sim.impression_values("aa")))
    _publish(kafka_bootstrap, ev_topic, [e.to_json_bytes() for e in sim.events()])
    rep = R.run(
        kafka_bootstrap, impressions_topic=imp_topic, events_topic=ev_topic, out_dir=tmp_path, progress=False
    )
    assert rep.experiment == "aa"  # the only experiment in the topic
    assert rep.verdict.startswith("no difference yet — about ") and rep.verdict.endswith(
        "more impressions needed"
    )
    assert (tmp_path / "purchase.png").exists()

    with pytest.raises(UserError, match=r"--bootstrap 127.0.0.1:1: cannot reach Kafka"):
        R.run(
            "127.0.0.1:1",
            impressions_topic=imp_topic,
            events_topic=ev_topic,
            out_dir=tmp_path,
            progress=False,
        )
