"""recstack against a real 3-master Redis Cluster (``infra/redis-cluster.sh``).

The cluster is started for this module when it is not running yet (and stopped again after),
on ``RECSTACK_REDIS_CLUSTER_PORT`` (default 7000) and the two ports after it; every test starts
from an empty cluster. Scenarios: the stream consumer's exactly-once effect through producer
duplicates, malformed records and a SIGKILL mid-stream, and through a restart of the whole
cluster (features read back through Feast's own ``get_online_features``); a node's script
refused by a slot that already holds part of a batch; event-id claims; Feast and the fast read
path agreeing on each other's writes; the ranking service's lean cluster transport (redis-py's
answers, a stale slot map); the ranking server serving Rank/Recommend from cluster features, a
user's new events changing its answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "infra" / "redis-cluster.sh"


def _script(action: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), action], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    """``redis+cluster://127.0.0.1:PORT`` of a running 3-master cluster (started here if needed)."""
    port = int(os.environ.get("RECSTACK_REDIS_CLUSTER_PORT", "7000"))
    started = _script("status").returncode != 0
    if started:
        result = _script("start")
        assert result.returncode == 0, f"infra/redis-cluster.sh start failed:\n{result.stdout}{result.stderr}"
    yield f"redis+cluster://127.0.0.1:{port}"
    if started:
        _script("stop")


@pytest.fixture
def cluster(cluster_url: str):
    """A ``RedisCluster`` client on an emptied cluster."""
    from recstack.redis_url import connect

    result = _script("flush")
    assert result.returncode == 0, result.stdout + result.stderr
    client = connect(cluster_url)
    assert len(client.get_primaries()) == 3
    yield client
    client.close()


@pytest.fixture(scope="module")
def feast_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("feast"))


def _fence_keys_per_node(client, topic: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in client.get_primaries():
        conn = client.get_redis_connection(node)
        counts[node.name] = sum(1 for _ in conn.scan_iter(match=f"recstack:stream:{topic}:applied:{{*"))
    return counts


# ------------------------------------------------------------------------------------ stream


def test_stream_exactly_once_through_duplicates_malformed_and_a_kill(
    kafka_bootstrap, cluster_url, cluster, fresh_topic, tmp_path, feast_dir
):
    from test_stream_exactly_once import (
        KILL_SESSION_TIMEOUT_MS,
        Published,
        _config,
        _events,
        applied_records,
        assert_features_exact,
        consumer_process,
        consumer_thread,
        dead_letters,
        logged_event_ids,
        publish,
        publishing,
        wait_all_applied,
        wait_until,
    )

    from feature_store.store import open_store

    topic = fresh_topic(6)
    fresh_topic(1, name=f"{topic}.dlq")
    published = Published()
    event_log = tmp_path / "events"
    config = _config(
        kafka_bootstrap, cluster_url, topic, event_log, session_timeout_ms=KILL_SESSION_TIMEOUT_MS
    )
    events = _events(6_000, seed=11)
    proc = consumer_process(config)
    try:
        publish(kafka_bootstrap, topic, events[:500], published, dup_share=0.1, bad_share=0.02, seed=11)
        wait_until(lambda: applied_records(cluster, topic) >= published.records, 180, "the consumer to start")
        with publishing(
            kafka_bootstrap,
            topic,
            events[500:],
            published,
            rate=1_000,
            dup_share=0.1,
            bad_share=0.02,
            seed=12,
        ) as pub:
            wait_until(lambda: applied_records(cluster, topic) > 2_500, 90, "the consumer to apply events")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            killed_at = applied_records(cluster, topic)
            with consumer_thread(config):  # the restart
                wait_all_applied(cluster, topic, published, pub)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 0 < killed_at < published.records, "the kill did not land mid-stream"
    assert_features_exact(open_store(cluster_url, feast_dir), published.events)

    distinct = {ev.event_id for ev in published.events}
    assert len(published.events) > len(distinct), "no producer duplicates were sent"
    assert set(logged_event_ids(event_log)) == distinct
    letters = dead_letters(kafka_bootstrap, f"{topic}.dlq", len(published.malformed))
    sources = {
        (int(dict(r.headers)["source-partition"]), int(dict(r.headers)["source-offset"])) for r in letters
    }
    assert sources == {(p, o) for p, o, _ in published.malformed}
    # the writes really were spread: every master holds per-slot fences of this topic
    per_node = _fence_keys_per_node(cluster, topic)
    assert len(per_node) == 3 and all(n > 0 for n in per_node.values()), per_node


def test_stream_exactly_once_through_a_cluster_restart(
    kafka_bootstrap, cluster_url, cluster, fresh_topic, tmp_path, feast_dir
):
    from test_stream_exactly_once import (
        Published,
        _config,
        _events,
        applied_records,
        assert_features_exact,
        consumer_thread,
        publishing,
        wait_all_applied,
        wait_until,
    )

    from feature_store.store import open_store

    topic = fresh_topic(6)
    fresh_topic(1, name=f"{topic}.dlq")
    published = Published()
    with consumer_thread(_config(kafka_bootstrap, cluster_url, topic, tmp_path / "events")) as consumer:
        with publishing(
            kafka_bootstrap, topic, _events(6_000, seed=13), published, rate=1_000, dup_share=0.05
        ) as pub:
            wait_until(lambda: applied_records(cluster, topic) > 1_500, 120, "the consumer to apply events")
            result = _script("restart")  # every node stops (AOF fsynced) and comes back with its slots
            assert result.returncode == 0, result.stdout + result.stderr
            wait_all_applied(cluster, topic, published, pub)
        assert consumer.metrics.redis_retries._value.get() > 0, "the restart went unnoticed"
    assert_features_exact(open_store(cluster_url, feast_dir), published.events)


def test_a_slot_holding_part_of_a_batch_refuses_then_the_rest_applies_once(cluster_url, cluster):
    """What a crash between two nodes' scripts leaves behind: one slot already holds the batch."""
    from feature_store.cluster import ClusterFeatureWriter, slot_fence_key
    from feature_store.reads import read_features
    from feature_store.values import ItemDelta, UserDelta
    from feature_store.writes import BatchGuard

    writer = ClusterFeatureWriter(cluster)
    offsets_key = "recstack:stream:t:applied"
    users = {
        f"user-{k}": UserDelta(views=1, last_event_ts=1_000 + k, recent_items=[f"item-{k}"])
        for k in range(30)
    }
    items = {f"item-{k}": ItemDelta(views=1, last_event_ts=1_000 + k, trending=1.0) for k in range(30)}
    slots: dict[int, set[int]] = {}
    for k in range(30):
        slots.setdefault(writer.user_slot(f"user-{k}"), set()).add(0)
        slots.setdefault(writer.item_slot(f"item-{k}"), set()).add(0)
    # an earlier attempt of the same records (offsets 0..29) already went through in one slot
    done = writer.user_slot("user-3")
    cluster.hset(slot_fence_key(offsets_key, done), "0", "29")

    def guard(floors=None) -> BatchGuard:
        return BatchGuard(
            offsets_key=offsets_key,
            expected={0: -1},
            applied={0: 29},
            slot_partitions=slots,
            floors=floors or {},
        )

    refused = writer.apply(users, items, guard(), writer.read(list(users)))
    assert not refused.ok and refused.floors[(done, 0)] == 29
    assert cluster.hget(offsets_key, "0") is None, "the global fence moved before every slot was written"
    # the retry leaves that slot's part out (as the consumer does with the floors it learned)
    left_out = {u for u in users if writer.user_slot(u) == done}
    assert "user-3" in left_out
    retry_slots = {s: p for s, p in slots.items() if (s, 0) not in refused.floors}
    retry_users = {u: d for u, d in users.items() if (writer.user_slot(u), 0) not in refused.floors}
    retry_items = {i: d for i, d in items.items() if (writer.item_slot(i), 0) not in refused.floors}
    retry = BatchGuard(
        offsets_key=offsets_key,
        expected={0: -1},
        applied={0: 29},
        slot_partitions=retry_slots,
        floors=refused.floors,
    )
    assert writer.apply(retry_users, retry_items, retry, writer.read(list(retry_users))).ok
    assert cluster.hget(offsets_key, "0") == b"29"
    got_users, got_items = read_features(cluster, list(users), list(items))
    for user_id, features in zip(users, got_users, strict=True):
        if user_id in left_out:
            assert features is None  # written by the "earlier attempt" in the test's story, not twice here
        else:
            assert features is not None and features.views == 1
    assert all(
        f is not None and f.views == 1 for i, f in zip(items, got_items, strict=True) if i in retry_items
    )
    # applying the same records again changes nothing: every slot's fence is past them
    again = writer.apply(retry_users, retry_items, retry, writer.read(list(retry_users)))
    assert not again.ok and again.fenced_partition == 0
    assert [u.views for u in read_features(cluster, list(retry_users), [])[0]] == [1] * len(retry_users)


def test_claims_make_each_event_id_count_once(cluster):
    from feature_store.cluster import ClusterFeatureWriter

    writer = ClusterFeatureWriter(cluster)
    keys = [f"recstack:eid:{k}".encode() for k in range(50)]
    first = writer.read([], keys, claims=[b"t:0:%d" % k for k in range(50)])
    assert first.seen == [None] * 50  # claimed by these records
    again = writer.read([], keys, claims=[b"t:0:%d" % k for k in range(50)])
    assert again.seen == [None] * 50  # the same records again (a retry): still theirs
    other = writer.read([], keys[:10], claims=[b"t:3:%d" % k for k in range(10)])
    assert other.seen == [b"t:0:%d" % k for k in range(10)]  # another record with the same ids: duplicates
    assert all(0 < cluster.ttl(key) <= 86_400 for key in keys)


# ------------------------------------------------------------------------------------ Feast


def test_feast_and_the_fast_path_read_each_others_writes(cluster_url, cluster, feast_dir):
    from datetime import UTC, datetime

    import pandas as pd
    from feast.data_source import PushMode

    from feature_store.reads import read_features
    from feature_store.store import open_store
    from feature_store.values import ItemFeatures, UserFeatures
    from feature_store.writes import write_features

    store = open_store(cluster_url, feast_dir)
    users = {f"fast-{k}": UserFeatures(views=k, purchases=1, recent_items=[f"i{k}", "i0"]) for k in range(20)}
    items = {f"i{k}": ItemFeatures(views=3 * k, trending=k / 2, category="c1") for k in range(20)}
    write_features(cluster, users=users, items=items, written_at_ms=1_700_000_000_000)
    got = store.get_online_features(
        features=["user_activity:views", "user_activity:purchases", "user_activity:recent_items"],
        entity_rows=[{"user_id": u} for u in users],
    ).to_dict()
    assert got["views"] == [f.views for f in users.values()]
    assert got["recent_items"] == [f.recent_items for f in users.values()]
    got = store.get_online_features(
        features=["item_popularity:views", "item_popularity:category"],
        entity_rows=[{"item_id": i} for i in items],
    ).to_dict()
    assert got["views"] == [f.views for f in items.values()] and set(got["category"]) == {"c1"}

    pushed_at = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    store.push(
        "user_activity_push",
        pd.DataFrame(
            {
                "user_id": ["pushed-1", "pushed-2"],
                "views": [4, 9],
                "add_to_carts": [1, 0],
                "purchases": [0, 2],
                "last_event_ts": [1_714_564_800_000, 1_714_564_800_001],
                "recent_items": [["a", "b"], ["c"]],
                "purchased_items": [[], ["c"]],
                "top_categories": [["c9"], []],
                "top_category_weights": [[4], []],
                "event_timestamp": [pushed_at, pushed_at],
            }
        ),
        to=PushMode.ONLINE,
    )
    (one, two), _ = read_features(cluster, ["pushed-1", "pushed-2"], [])
    assert (one.views, one.recent_items, one.top_categories) == (4, ["a", "b"], ["c9"])
    assert (two.purchases, two.purchased_items) == (2, ["c"])


# ------------------------------------------------------------------------------------ ranking


def test_the_lean_cluster_transport_reads_what_redis_py_reads_and_follows_redirects(cluster_url, cluster):
    from feature_store.reads import read_features
    from feature_store.values import ItemFeatures, UserFeatures
    from feature_store.writes import write_features
    from services.ranking.redis_client import ClusterPipelinedRedis

    users = {f"u{k}": UserFeatures(views=k, recent_items=[f"i{j}" for j in range(k)]) for k in range(20)}
    items = {f"i{k}": ItemFeatures(views=k, trending=k / 3, category=f"c{k % 4}") for k in range(300)}
    write_features(cluster, users=users, items=items)
    want_users, want_items = [*users, "nobody"], [*items, "no-such-item", "ü-ñíçødé"]
    expected = read_features(cluster, want_users, want_items)

    fast = ClusterPipelinedRedis(cluster_url, timeout_s=5.0)
    assert read_features(fast, want_users, want_items) == expected
    table = fast.load_slots()
    assert len(set(table)) == 3  # the reads really went to three nodes
    # a stale slot map (as after resharding or a failover): every node but one answers MOVED
    wrong = table[0]
    fast._slot_nodes = [wrong] * len(table)
    assert read_features(fast, want_users, want_items) == expected
    assert fast._slot_nodes == table  # the map was reloaded
    assert read_features(fast, [], []) == ([], [])
    assert fast.ping()
    fast.close()


def test_ranking_serves_from_the_cluster_and_new_events_change_the_answer(
    kafka_bootstrap, cluster_url, cluster, fresh_topic, tmp_path
):
    from test_ranking_server import ITEMS, V1, ServerThread, publish_model, rank
    from test_stream_exactly_once import (
        Published,
        _config,
        applied_records,
        consumer_thread,
        publish,
        wait_until,
    )

    from feature_store.values import ItemFeatures
    from feature_store.writes import write_features
    from recstack.events import Event
    from recstack.v1 import ranking_pb2
    from services.ranking.config import RankingConfig

    models = tmp_path / "models"
    models.mkdir()
    publish_model(models, V1, seed=1)
    write_features(
        cluster,
        items={
            item: ItemFeatures(views=10 * k, purchases=k // 3, trending=k / 7.0)
            for k, item in enumerate(ITEMS)
        },
    )
    server = ServerThread(
        RankingConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            models_dir=models,
            redis_url=cluster_url,
            model_poll_interval_s=0.1,
            max_queue_wait_ms=0.0,
            redis_timeout_ms=2000.0,
            redis_retry_interval_s=0.1,
        )
    )
    try:
        candidates = ITEMS[:80]
        cold = server.stub.Rank(rank("shopper", candidates), timeout=30)
        assert cold.path == "light" and not cold.degraded and cold.model_version == V1

        topic = fresh_topic(6)
        fresh_topic(1, name=f"{topic}.dlq")
        now = int(time.time() * 1000)
        events = [
            Event(
                f"shopper-{k}",
                "shopper",
                ITEMS[200 + k],
                "view" if k % 3 else "add_to_cart",
                now - 60_000 + k,
            )
            for k in range(40)
        ]
        published = Published()
        publish(kafka_bootstrap, topic, events, published)
        with consumer_thread(_config(kafka_bootstrap, cluster_url, topic, tmp_path / "events")):
            wait_until(
                lambda: applied_records(cluster, topic) >= published.records, 120, "the events to apply"
            )

        def warm_answer():
            answer = server.stub.Rank(rank("shopper", candidates), timeout=30)
            return answer if answer.path != "light" else None

        wait_until(warm_answer, 30, "the ranking service to see the shopper's history")
        warm = warm_answer()
        assert warm is not None and not warm.degraded
        cold_scores = {x.item_id: x.score for x in cold.items}
        warm_scores = {x.item_id: x.score for x in warm.items}
        assert any(abs(cold_scores[i] - warm_scores[i]) > 1e-4 for i in candidates)

        recommended = server.stub.Recommend(ranking_pb2.RecommendRequest(user_id="shopper", k=20), timeout=30)
        assert len(recommended.items) == 20 and not recommended.degraded
        scores = [x.score for x in recommended.items]
        assert scores == sorted(scores, reverse=True)
        assert Counter(x.item_id for x in recommended.items).most_common(1)[0][1] == 1
    finally:
        server.close()


def test_the_experiment_state_is_written_in_one_transaction_on_a_cluster(cluster):
    """`recstack experiment` against the Kubernetes base's Redis Cluster: WATCH/MULTI on one key."""
    from recstack.experiments import state
    from recstack.experiments.assign import Arm

    first = state.write(cluster, state.new_experiment("ab", [Arm("A", "v1", 0.5), Arm("B", "v2", 0.5)]))
    assert first.generation == 1 and state.read(cluster) == first
    ended = state.end(cluster, promoted="B")
    assert (ended.generation, ended.active, ended.promoted) == (2, False, "B")
    assert state.read(cluster) == ended
