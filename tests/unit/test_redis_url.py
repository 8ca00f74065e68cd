"""Redis URLs: one server keeps redis-py's meaning; ``redis+cluster://`` names a Redis Cluster."""

from __future__ import annotations

import argparse

import pytest
from redis.crc import key_slot

from feature_store.cluster import SLOTS, slot_fence_key, slot_tag
from feature_store.store import connection_string
from recstack.errors import UserError
from recstack.flags import redis_url
from recstack.redis_url import ClusterURL, check, is_cluster, parse_cluster


def test_cluster_urls_are_parsed_into_nodes_and_credentials() -> None:
    assert parse_cluster("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/0") == ClusterURL(
        nodes=(("127.0.0.1", 7000), ("127.0.0.1", 7001))
    )
    parsed = parse_cluster("rediss+cluster://app:s%40cret@redis-0.redis:6380,redis-1.redis")
    assert parsed == ClusterURL(
        nodes=(("redis-0.redis", 6380), ("redis-1.redis", 6379)), username="app", password="s@cret", ssl=True
    )
    assert parse_cluster("redis+cluster://only-a-password@h:1").password == "only-a-password"
    assert is_cluster("redis+cluster://h:1") and not is_cluster("redis://h:1/0")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis+cluster://h:1/2", "only database 0"),
        ("redis+cluster://h:port", "HOST:PORT"),
        ("redis+cluster://", "HOST:PORT"),
        ("http://h:1", "redis+cluster://"),
    ],
)
def test_bad_urls_name_the_flag_and_the_problem(url: str, words: str) -> None:
    with pytest.raises(UserError, match="--redis") as info:
        check(url)
    assert words in str(info.value)
    with pytest.raises(argparse.ArgumentTypeError) as info:
        redis_url(url)
    assert words in str(info.value)


def test_plain_urls_are_unchanged() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://h:1/2", "unix:///run/redis.sock?db=1"):
        assert check(url) == url == redis_url(url)
    # Credentials as JSON strings: Feast json-loads each value (see store._feast_value).
    assert connection_string("redis://u:p@h:1/3") == 'h:1,db=3,username="u",password="p"'


def test_feast_gets_its_cluster_connection_string() -> None:
    assert connection_string("redis+cluster://a:1,b:2") == "a:1,b:2"
    assert connection_string("rediss+cluster://:pw@a:1") == 'a:1,password="pw",ssl=true'
    assert connection_string("redis+cluster://:123@a:1") == 'a:1,password="123"'


def test_every_slot_has_a_hash_tag_that_lands_in_it() -> None:
    for slot in (0, 1, 5460, 5461, 10922, SLOTS - 1):
        tag = slot_tag(slot)
        assert key_slot(tag.encode()) == slot
        assert key_slot(slot_fence_key("recstack:stream:user-events:applied", slot)) == slot
