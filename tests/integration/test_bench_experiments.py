"""``recstack bench --experiments --experiment-ladder``, the smallest run: real server processes,
a tiny published model, real Redis (features and the experiment state) and a private Kafka topic
(impressions). Figures are meaningless at this size; the rows, the counters and the clean-up are
what is checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_ranking_server import ITEMS, publish_model

from feature_store.values import UserFeatures
from loadtests import experiment_bench
from loadtests.saturation import BenchConfig, SearchConfig, run_bench
from recstack.v1 import ranking_pb2

pytestmark = pytest.mark.integration

USERS = [f"bench-shopper-{k}" for k in range(40)]


def test_bench_measures_experiment_rounds_and_the_experiment_ladder(
    tmp_path: Path, redis_url: str, kafka_bootstrap: str, fresh_topic
) -> None:
    import redis

    from feature_store.writes import write_features
    from recstack.experiments import state

    models = tmp_path / "models"
    publish_model(models, "v20240101-000000", seed=1)
    client = redis.Redis.from_url(redis_url)
    write_features(
        client, users={u: UserFeatures(views=3, recent_items=[ITEMS[k % 50]]) for k, u in enumerate(USERS)}
    )
    requests = [ranking_pb2.RankRequest(user_id=u, item_ids=ITEMS[:40]).SerializeToString() for u in USERS]
    # One fixed step; an SLO no shared machine misses, so that the real server has an SLO rate.
    search = SearchConfig(
        rates=(20.0,), max_fixed_steps=1, step_s=1.0, min_calls=20, warmup_s=0.5, idle_s=0.2,
        fine_steps=0, cooldown_s=0.0, slo_p99_ms=2000.0,
    )  # fmt: skip
    cfg = BenchConfig(
        out=tmp_path / "bench",
        servers=("real",),
        models=str(models),
        redis=redis_url,
        min_recent_items=0,
        search=search,
        experiments=True,
        experiment_ladder=True,
        kafka_bootstrap=kafka_bootstrap,
        impressions_topic=fresh_topic(1),
        experiment_min_calls=20,
    )
    try:
        results = run_bench(cfg, requests=requests)
        exp = results["experiments"]
        assert exp["status"] == "ok", exp.get("error")
        assert exp["order"] == ["none", "ab", "shadow", "shadow", "ab", "none"]
        assert exp["rate"] == pytest.approx(10.0)
        states = exp["states"]
        assert all(states[s]["calls"] == 40 and states[s]["ok"] == 40 for s in experiment_bench.STATES)
        assert states["shadow"]["counters"]["shadow_batches"].get("scored", 0) > 0
        assert sum(states["none"]["counters"]["shadow_batches"].values()) == 0
        assert states["ab"]["counters"]["impressions_published"] > 0
        assert all(states[s]["cpu_ms_per_call"] for s in experiment_bench.STATES)
        assert exp["verdict"]["shadow"]["p99_delta_ms"] is not None
        ab = results["servers"]["real-ab"]
        assert ab["status"] == "ok", ab.get("error")
        assert ab["experiment_counters"]["impressions_published"] > 0
        summary = (cfg.out / "summary.md").read_text()
        assert "## Experiments: what they cost the real server" in summary
        assert "| shadow | 40 |" in summary and "| CPU per call difference |" in summary
        assert "real-ab (A/B experiment on): max rate" in summary
        # The bench cleared its experiment: the Redis it was given serves no experiment now.
        stored = state.read(client)
        assert stored is not None and not stored.active
        assert not (models / exp["versions"]["B"]).exists()  # copies went to the output folder
    finally:
        client.close()
