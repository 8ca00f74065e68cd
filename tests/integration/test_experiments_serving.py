"""Experiments on a real ranking server, real Redis (the experiment state) and real Kafka
(impressions), driven through ``recstack experiment`` as an operator would.

Three published versions: V3 is the default (the newest), A serves V1, B serves V2, and a shadow
C scores with V3. Users keep their arm, the split is about right, answers carry a request id and
the arm, every answer's impression arrives with the same request id, the shadow never changes an
answer, ``promote`` makes B's version everyone's default and ``stop`` returns traffic to it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer
from test_ranking_server import ITEMS, ServerThread, publish_model, wait_for

from feature_store.values import UserFeatures
from recstack.cli import main as recstack
from recstack.v1 import ranking_pb2
from services.ranking.config import RankingConfig

pytestmark = pytest.mark.integration

V1, V2, V3 = "v20240101-000000", "v20240102-000000", "v20240103-000000"
USERS = [f"shopper-{k}" for k in range(160)]
CANDIDATES = ITEMS[:40]


def _rank(server: ServerThread, user: str) -> ranking_pb2.RankResponse:
    return server.stub.Rank(ranking_pb2.RankRequest(user_id=user, item_ids=CANDIDATES), timeout=30)


def _cli(*argv: str) -> None:
    assert recstack(["experiment", *argv]) == 0


def _consume(bootstrap: str, topic: str, want: set[str], timeout_s: float = 60.0) -> dict[str, dict]:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=1000
    )
    got: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while not want <= got.keys() and time.monotonic() < deadline:
            for message in consumer:
                record = json.loads(message.value)
                assert message.key == record["user_id"].encode()  # keyed by user: one user, one partition
                got[record["request_id"]] = record
    finally:
        consumer.close()
    return got


@pytest.fixture
def published(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    for seed, version in enumerate((V1, V2, V3), 1):
        publish_model(models, version, seed=seed)
    return models


def test_experiment_start_promote_and_stop_on_a_real_server(
    published: Path, redis_url: str, kafka_bootstrap: str, fresh_topic
) -> None:
    import redis

    from feature_store.writes import write_features

    topic = fresh_topic(3)
    client = redis.Redis.from_url(redis_url)
    write_features(
        client, users={u: UserFeatures(views=3, recent_items=[ITEMS[k % 50]]) for k, u in enumerate(USERS)}
    )
    client.close()
    server = ServerThread(
        RankingConfig(
            port=0,
            metrics_port=0,
            models_dir=published,
            redis_url=redis_url,
            model_poll_interval_s=0.1,
            experiment_poll_interval_s=0.1,
            max_queue_wait_ms=0.0,
            redis_timeout_ms=2000.0,
            kafka_bootstrap=kafka_bootstrap,
            impressions_topic=topic,
            shadow_cpu_share=100.0,  # no CPU budget here: the shadow scores whenever the batcher is idle
        )
    )
    ops = ("--redis", redis_url)
    try:
        before = _rank(server, USERS[0])
        assert (before.model_version, before.arm, len(before.request_id)) == (V3, "", 32)

        # --- 50/50 between V1 and V2, shadow V3 --------------------------------------------------
        _cli("start", "--name", "ab", "--arm", f"A={V1}:0.5", "--arm", f"B={V2}:50%",
             "--shadow", f"C={V3}", "--models", str(published), *ops)  # fmt: skip
        wait_for(lambda: _rank(server, USERS[0]).arm != "", "the experiment to reach the server")
        first = {u: _rank(server, u) for u in USERS}
        again = {u: _rank(server, u) for u in USERS}
        version_of = {"A": V1, "B": V2}
        for u in USERS:
            assert first[u].arm == again[u].arm in version_of  # a user keeps their arm
            assert first[u].model_version == again[u].model_version == version_of[first[u].arm]
            assert first[u].request_id != again[u].request_id
        share_a = sum(first[u].arm == "A" for u in USERS) / len(USERS)
        assert 0.35 < share_a < 0.65, share_a  # 160 users: 0.5 +- 0.04 (1 sd)

        # --- every answer's impression, with the same request id ----------------------------------
        answers = {r.request_id: (u, r) for u in USERS for r in (first[u], again[u])}
        impressions = _consume(kafka_bootstrap, topic, set(answers))
        assert set(answers) <= impressions.keys()
        shadowed = 0
        for request_id, (user, response) in answers.items():
            imp = impressions[request_id]
            assert (imp["user_id"], imp["experiment"], imp["arm"], imp["model_version"]) == (
                user,
                "ab",
                response.arm,
                response.model_version,
            )
            assert [i["item_id"] for i in imp["items"]] == [x.item_id for x in response.items]
            assert [i["position"] for i in imp["items"]] == list(range(1, len(response.items) + 1))
            assert abs(imp["ts"] - time.time() * 1000) < 600_000
            if "shadow" in imp:
                shadowed += 1
                assert imp["shadow"]["version"] == V3
                assert sorted(i["item_id"] for i in imp["shadow"]["items"]) == sorted(CANDIDATES)
        # Sequential calls leave the batcher idle between them: the shadow scores (nearly) all.
        assert shadowed >= len(answers) // 2, shadowed
        scored = server.metric("recstack_shadow_batches_total", {"outcome": "scored"})
        dropped = server.metric("recstack_shadow_batches_total", {"outcome": "dropped"})
        assert scored >= shadowed and scored + dropped >= len(answers)
        assert server.metric("recstack_shadow_batches_total", {"outcome": "failed"}) == 0
        wait_for(
            lambda: server.metric("recstack_impressions_published_total") >= len(answers) + 1,
            "the broker's acknowledgements to be counted",
        )
        assert server.metric("recstack_impressions_dropped_total") == 0

        # --- the shadow never changes an answer: the same split without it answers alike ----------
        _cli("stop", *ops)
        _cli("start", "--name", "ab", "--arm", f"A={V1}:0.5", "--arm", f"B={V2}:0.5",
             "--models", str(published), *ops)  # fmt: skip
        wait_for(lambda: server.metric("recstack_experiment_generation") >= 3, "the restarted experiment")
        for u in USERS[:40]:
            plain = _rank(server, u)
            assert (plain.arm, plain.model_version) == (first[u].arm, first[u].model_version)
            assert [x.item_id for x in plain.items] == [x.item_id for x in first[u].items]
            assert [x.score for x in plain.items] == pytest.approx(
                [x.score for x in first[u].items], abs=1e-5
            )

        # --- promote B: DEFAULT names V2, the experiment ends, everyone gets V2 -------------------
        _cli("promote", "B", "--models", str(published), *ops)
        assert (published / "DEFAULT").read_text().strip() == V2
        wait_for(
            lambda: all((r.model_version, r.arm) == (V2, "") for r in (_rank(server, u) for u in USERS[:40])),
            "every user to get the promoted version",
        )

        # --- a version that cannot be served falls back to the default; stop returns traffic ------
        _cli("start", "--name", "broken", "--arm", f"A={V1}:0.5", "--arm", "X=v20991231-000000:0.5",
             "--skip-version-check", *ops)  # fmt: skip
        wait_for(lambda: _rank(server, USERS[0]).arm != "", "the second experiment")
        seen = {_rank(server, u).arm: _rank(server, u) for u in USERS}
        assert seen["X"].model_version == V2  # the default serves the arm whose version is refused
        assert seen["A"].model_version == V1
        assert server.metric("recstack_experiment_version_refusals_total") >= 1
        _cli("stop", *ops)
        wait_for(
            lambda: all((r.model_version, r.arm) == (V2, "") for r in (_rank(server, u) for u in USERS)),
            "traffic back to the default version",
        )
    finally:
        server.close()


def test_the_state_in_redis_is_written_whole_with_a_generation_and_guards_a_running_experiment(
    redis_url: str, capsys
) -> None:
    from recstack.experiments import state
    from recstack.experiments.assign import Arm, InvalidExperiment
    from recstack.redis_url import connect

    client = connect(redis_url)
    ops = ("--redis", redis_url)
    try:
        assert recstack(["experiment", "status", *ops]) == 0
        assert "no experiment has run" in capsys.readouterr().out
        first = state.write(client, state.new_experiment("one", [Arm("A", V1, 0.7), Arm("B", V2, 0.3)]))
        assert first.generation == 1 and state.read(client) == first
        with pytest.raises(InvalidExperiment, match="experiment 'one' is running; stop or promote it first"):
            state.write(client, state.new_experiment("two", [Arm("A", V1, 1.0)]))
        assert (
            recstack(
                ["experiment", "start", "--name", "two", "--arm", f"A={V1}:1", "--skip-version-check", *ops]
            )
            == 2
        )
        assert "experiment 'one' is running" in capsys.readouterr().err
        assert recstack(["experiment", "status", *ops]) == 0
        out = capsys.readouterr().out
        assert "experiment one: running since" in out and f"arm B: version {V2}, 30.0% of users" in out
        assert recstack(["experiment", "promote", "C", "--models", "/nonexistent", *ops]) == 2
        assert "arm 'C': experiment 'one' has arms A, B" in capsys.readouterr().err
        ended = state.end(client)
        assert (ended.active, ended.generation, ended.promoted) == (False, 2, None) and ended.ended_at
        assert recstack(["experiment", "stop", *ops]) == 2
        assert "stop: experiment: none is running" in capsys.readouterr().err
        second = state.write(client, state.new_experiment("two", [Arm("A", V1, 1.0)]))
        assert second.generation == 3  # generations never repeat, so replicas see every change
    finally:
        client.close()


def test_impressions_land_on_the_partition_of_their_users_events(kafka_bootstrap, fresh_topic):
    """Attribution joins partition p of the impressions with partition p of the events: the
    impressions producer (librdkafka) must pick the partition the events' producers (kafka-python,
    the Java client) pick for the same user, murmur2 of the key."""
    from kafka.partitioner.default import murmur2

    from recstack.kafka import KafkaSecurity
    from services.ranking.impressions import ImpressionPublisher, kafka_producer_factory
    from services.ranking.metrics import RankingMetrics

    topic = fresh_topic(6)
    metrics = RankingMetrics()
    publisher = ImpressionPublisher(
        kafka_producer_factory(kafka_bootstrap, KafkaSecurity(), 5), topic, metrics=metrics
    )
    publisher.start()
    users = [f"user-{k}" for k in range(60)]
    publisher.offer_many(
        (f"{k:032x}", u, "A", V1, ["i1"], 1_700_000_000_000, "") for k, u in enumerate(users)
    )
    publisher.stop()
    assert metrics.value("recstack_impressions_published_total") == len(users)
    consumer = KafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    try:
        placed = {m.key.decode(): m.partition for m in consumer}
    finally:
        consumer.close()
    expected = {u: (murmur2(u.encode()) & 0x7FFFFFFF) % 6 for u in users}  # kafka-python's default
    assert placed == expected
    assert len(set(placed.values())) == 6  # the users spread over every partition
