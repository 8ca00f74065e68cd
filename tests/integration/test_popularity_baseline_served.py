"""The popularity baseline served by a real ranking server, hot-swapped with a trained version.

A trained version (``test_ranking_server``'s small random model) serves first; the baseline is
published with ``recstack publish-baseline popularity`` from an event log and the server swaps to
it, then a newer trained version swaps back: one loading path, one set of checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_ranking_server import ITEMS, V1, ServerThread, publish_model, seed_features, wait_for, warm_user

from recstack.cli import main
from recstack.v1 import ranking_pb2
from services.ranking.config import RankingConfig

pytestmark = pytest.mark.integration

BASELINE, V3 = "v20240102-000000", "v20240103-000000"


def server_for(models: Path, redis_url: str) -> ServerThread:
    """A ranking server on loopback (any free port) serving ``models``, polling it every 0.1 s."""
    config = RankingConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        models_dir=models,
        redis_url=redis_url,
        model_poll_interval_s=0.1,
        max_queue_wait_ms=0.0,  # a busy shared test machine must not shed calls
        redis_timeout_ms=2000.0,
    )
    return ServerThread(config)


def _event_log(path: Path, popularity: dict[str, int]) -> Path:
    """An event log where item ``i`` has ``popularity[i]`` views (intent weight 1 each)."""
    lines = []
    for item, n in popularity.items():
        for k in range(n):
            event = {"event_id": f"{item}-{k}", "user_id": f"u{k % 5}", "item_id": item}
            lines.append(json.dumps({**event, "event_type": "view", "ts": 1_700_000_000_000 + k}) + "\n")
    path.write_text("".join(lines))
    return path


def test_baseline_is_loaded_ranks_by_popularity_and_hot_swaps_with_a_trained_version(
    redis_url: str, tmp_path: Path
):
    models = tmp_path / "models"
    models.mkdir()
    publish_model(models, V1, seed=1)
    # 40 items, popularity 40 .. 1 in a shuffled order of ids
    rng = np.random.default_rng(7)
    popular = [ITEMS[i] for i in rng.permutation(120)[:40]]
    popularity = {item: 40 - k for k, item in enumerate(popular)}
    log = _event_log(tmp_path / "events.jsonl", popularity)
    seed_features(redis_url, {"buyer": warm_user(ITEMS[:5], purchased=popular[:3])})

    server = server_for(models, redis_url)
    try:
        candidates = [popular[k] for k in rng.permutation(40)[:25]] + ["never-seen"]

        def rank(user: str = "someone") -> ranking_pb2.RankResponse:
            return server.stub.Rank(ranking_pb2.RankRequest(user_id=user, item_ids=candidates), timeout=10)

        assert rank().model_version == V1
        argv = ["publish-baseline", "popularity", "--models", str(models), "--from", str(log)]
        assert main([*argv, "--version", BASELINE]) == 0
        wait_for(lambda: rank().model_version == BASELINE, "the server to swap to the baseline")

        expected = sorted(candidates, key=lambda i: -popularity.get(i, 0))  # never-seen: 0, last
        for user in ("someone", "buyer", "another"):  # the same for everyone
            answer = rank(user)
            assert [i.item_id for i in answer.items] == expected
            assert [i.score for i in answer.items] == [float(popularity.get(i, 0)) for i in expected]
        reply = server.stub.Recommend(ranking_pb2.RecommendRequest(user_id="buyer", k=5), timeout=10)
        assert reply.model_version == BASELINE
        assert [i.item_id for i in reply.items] == popular[3:8]  # the top 3 were purchased
        reply = server.stub.Recommend(ranking_pb2.RecommendRequest(user_id="cold", k=5), timeout=10)
        assert [i.item_id for i in reply.items] == popular[:5]

        publish_model(models, V3, seed=3)
        wait_for(lambda: rank().model_version == V3, "the server to swap back to a trained version")
        assert [i.item_id for i in rank().items] != expected  # the trained model's own order
        assert server.metric("recstack_ranking_model_reloads_total", {"result": "success"}) == 3
        assert server.metric("recstack_ranking_model_reloads_total", {"result": "failure"}) == 0
    finally:
        server.close()
