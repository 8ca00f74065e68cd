"""The ranking service's lean Redis transport on a real Redis: redis-py's answers, clean failures."""

from __future__ import annotations

import threading

import pytest
import redis

from feature_store.reads import read_features
from feature_store.values import ItemFeatures, UserFeatures
from feature_store.writes import write_features
from services.ranking.redis_client import PipelinedRedis, pack

pytestmark = pytest.mark.integration


def test_read_features_gives_what_redis_py_gives(redis_client, redis_url):
    users = {
        f"u{k}": UserFeatures(views=k, recent_items=[f"i{j}" for j in range(k)], last_event_ts=k)
        for k in range(5)
    }
    items = {f"i{k}": ItemFeatures(views=k, trending=k / 3, category=f"c{k}") for k in range(50)}
    write_features(redis_client, users=users, items=items)
    fast = PipelinedRedis(redis_url, timeout_s=5.0)
    want_users = [*users, "nobody"]
    want_items = [*items, "no-such-item", "ü-ñíçødé"]
    assert read_features(fast, want_users, want_items) == read_features(redis_client, want_users, want_items)
    assert read_features(fast, [], []) == ([], [])
    assert fast.ping()
    fast.close()


def test_connections_are_per_thread_and_reconnect_after_a_drop(redis_client, redis_url):
    write_features(redis_client, items={"a": ItemFeatures(views=7)})
    fast = PipelinedRedis(redis_url, timeout_s=5.0)
    results: list[int] = []

    def read() -> None:
        for _ in range(50):
            results.append(read_features(fast, [], ["a"])[1][0].views)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [7] * 200

    (own_id,) = fast.execute_packed([pack("CLIENT", "ID")])  # this thread's connection
    redis_client.execute_command("CLIENT", "KILL", "ID", own_id)
    with pytest.raises(redis.ConnectionError):
        read_features(fast, [], ["a"])  # this thread's connection was cut
    assert read_features(fast, [], ["a"])[1][0].views == 7  # and the next call reconnects
    fast.close()


def test_error_replies_raise_and_keep_the_connection_usable(redis_client, redis_url):
    redis_client.set("plain-string", "x")
    fast = PipelinedRedis(redis_url, timeout_s=5.0)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        fast.execute_packed([pack("HMGET", "plain-string", "f")])
    assert fast.ping()
    fast.close()


def test_nothing_listening_is_a_connection_error():
    fast = PipelinedRedis("redis://127.0.0.1:1/0", timeout_s=0.5)
    with pytest.raises(redis.ConnectionError):
        fast.ping()
