"""The benchmark's returning shoppers, read from a real Redis through the feature store's reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from feature_store.values import UserFeatures
from feature_store.writes import write_features
from loadtests import workload
from loadtests.saturation import BenchConfig, prepare_requests
from loadtests.shoppers import read_returning
from recstack.errors import UserError
from recstack.v1 import ranking_pb2

pytestmark = pytest.mark.integration


def _seed(client: Any, users: list[str], recent: int) -> None:
    write_features(client, {u: UserFeatures(views=recent, recent_items=[f"i{k}" for k in range(recent)])
                            for u in users})  # fmt: skip


def test_returning_shoppers_are_read_from_redis(redis_client: Any, redis_url: str) -> None:
    mix = workload.synthetic_workload(n_users=200)
    _seed(redis_client, mix.users[:60], 25)
    _seed(redis_client, mix.users[60:80], 5)  # too few recent items; the other 120 have no features
    chosen = read_returning(redis_client, mix.users, 20, min_users=50, where=redis_url)
    assert chosen.users == mix.users[:60] and chosen.checked == 200 and chosen.median_recent_items == 25.0

    with pytest.raises(UserError) as failed:
        read_returning(redis_client, mix.users, 30, min_users=50, where=redis_url)
    text = str(failed.value)
    assert f"only 0 of 200 users have at least 30 recent items in the features at {redis_url}" in text
    assert "make demo KEEP=1" in text and "recstack replay --source onlineretail" in text


def test_bench_requests_name_only_returning_shoppers(
    redis_client: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mix = workload.synthetic_workload(n_users=200)
    _seed(redis_client, mix.users[:55], 21)
    monkeypatch.setattr(workload, "load", lambda source: mix)
    cfg = BenchConfig(out=tmp_path, redis=redis_url, request_pool=300, candidates=10)
    requests, summary = prepare_requests(cfg)
    assert summary == {
        "users": 55,
        "checked": 200,
        "min_recent_items": 20,
        "median_recent_items": 21.0,
        "checked_in_redis": True,
    }
    named = {ranking_pb2.RankRequest.FromString(r).user_id for r in requests}
    assert len(requests) == 300 and named <= set(mix.users[:55]) and len(named) > 40


def test_a_redis_that_does_not_answer_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workload, "load", lambda source: workload.synthetic_workload())
    cfg = BenchConfig(out=tmp_path, redis="redis://127.0.0.1:1/0")
    with pytest.raises(UserError, match="cannot read the users' features from redis://127.0.0.1:1/0"):
        prepare_requests(cfg)
