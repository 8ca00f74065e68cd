"""Redis URLs: the one parser (every accepted form, its errors, redaction) and what each client is
given from it; ``redis+cluster://`` names a Redis Cluster."""

from __future__ import annotations

import argparse

import pytest
from redis.crc import key_slot

from feature_store.cluster import SLOTS, slot_fence_key, slot_tag
from feature_store.store import connection_string
from recstack.errors import UserError
from recstack.flags import redis_url
from recstack.redis_url import RedisURL, check, is_cluster, parse, parse_cluster, redact


def test_cluster_urls_are_parsed_into_nodes_and_credentials() -> None:
    assert parse_cluster("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/0") == RedisURL(
        "redis+cluster", nodes=(("127.0.0.1", 7000), ("127.0.0.1", 7001))
    )
    parsed = parse_cluster("rediss+cluster://app:s%40cret@redis-0.redis:6380,redis-1.redis")
    assert parsed == RedisURL(
        "rediss+cluster",
        (("redis-0.redis", 6380), ("redis-1.redis", 6379)),
        username="app",
        password="s@cret",
    )
    assert parsed.ssl and parsed.cluster
    # User info without a colon is a user name (RFC 3986, redis-py), for clusters as for one server.
    assert parse_cluster("redis+cluster://acl-user@h:1").username == "acl-user"
    assert parse_cluster("redis+cluster://acl-user@h:1").password is None
    assert parse_cluster("redis+cluster://h:1,h:2?password=p%40w").password == "p@w"
    assert is_cluster("redis+cluster://h:1") and not is_cluster("redis://h:1/0")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis+cluster://h:1/2", "only database 0"),
        ("redis+cluster://h:port", "port 1-65535"),
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


SECRET = 'p@ss:w/rd,1=2%"x'
ENC = "p%40ss%3Aw%2Frd%2C1%3D2%25%22x"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h:1/3", RedisURL("redis", (("h", 1),), db=3)),
        ("redis://h", RedisURL("redis", (("h", 6379),))),
        (f"redis://:{ENC}@h:1/3", RedisURL("redis", (("h", 1),), db=3, password=SECRET)),
        (f"redis://app:{ENC}@h:1/3", RedisURL("redis", (("h", 1),), db=3, username="app", password=SECRET)),
        (f"redis://h:1/3?password={ENC}", RedisURL("redis", (("h", 1),), db=3, password=SECRET)),
        (
            f"redis://h:1?db=3&username=app&password={ENC}",
            RedisURL("redis", (("h", 1),), None, 3, "app", SECRET),
        ),
        (f"rediss://:{ENC}@h:1/2", RedisURL("rediss", (("h", 1),), db=2, password=SECRET)),
        ("redis://[::1]:7/1", RedisURL("redis", (("::1", 7),), db=1)),
        (f"unix:///run/r.sock?db=4&password={ENC}", RedisURL("unix", (), "/run/r.sock", 4, None, SECRET)),
        (f"unix://:{ENC}@/run/r.sock?db=4", RedisURL("unix", (), "/run/r.sock", 4, None, SECRET)),
        ("unix:///run/r.sock", RedisURL("unix", (), "/run/r.sock", 0)),
        (
            f"redis+cluster://u:{ENC}@a:1,b:2/0",
            RedisURL("redis+cluster", (("a", 1), ("b", 2)), username="u", password=SECRET),
        ),
        (f"redis+cluster://a:1?password={ENC}", RedisURL("redis+cluster", (("a", 1),), password=SECRET)),
        # The same password twice is no conflict; an unencoded '@' in the user info still parses.
        (f"redis://:{ENC}@h:1/0?password={ENC}", RedisURL("redis", (("h", 1),), password=SECRET)),
        (
            f"rediss://:{ENC}@h:1/2?ssl_ca_certs=/etc/ca.pem",
            RedisURL("rediss", (("h", 1),), None, 2, None, SECRET, "/etc/ca.pem"),
        ),
        ("redis://:a@b@h:1/0", RedisURL("redis", (("h", 1),), password="a@b")),
    ],
)
def test_every_accepted_form_parses(url: str, expected: RedisURL) -> None:
    parsed = parse(url)
    assert parsed == expected and parsed.password == expected.password
    assert parse(parsed.to_url()) == parsed  # the canonical form reads back the same
    assert SECRET not in redact(url) and ENC not in redact(url)
    assert SECRET not in repr(parsed) and SECRET not in str(parsed)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        (f"redis://:{ENC}@h:1/0?password=other", "password is given twice"),
        (f"redis://h:1/0?pasword={ENC}", "unknown parameter 'pasword'"),
        (f"redis://h:1/0?password={ENC}&password={ENC}", "given twice"),
        (f"redis://:{ENC}@h:1/2?db=3", "two databases"),
        (f"redis://:{ENC}@h:1/x", "must be a number"),
        (f"redis://:{ENC}@h:99999/0", "port 1-65535"),
        (f"redis://:{ENC}@a:1,b:2/0", "redis+cluster://"),
        (f"redis+cluster://:{ENC}@a:1/3", "only database 0"),
        (f"unix://:{ENC}@somehost/r.sock", "socket path"),
        (f"http://:{ENC}@h:1", "expected redis://"),
        (f"redis://:{ENC}@h:1/0?ssl_ca_certs=/ca.pem", "needs TLS"),
        # A password cut at an unencoded '?' lands where a port or a parameter is expected.
        ('redis://app:p@ss:w/rd,1=2%"x?yz@h:1/0', "malformed query"),
        (f"redis://app:{SECRET}?oops=1@h:1/0", "hidden"),
    ],
)
def test_bad_urls_are_refused_without_showing_the_password(url: str, words: str) -> None:
    with pytest.raises(UserError) as info:
        parse(url)
    assert words in str(info.value) and str(info.value).startswith("--redis:")
    assert SECRET not in str(info.value) and ENC not in str(info.value)
    with pytest.raises(argparse.ArgumentTypeError) as flag_error:
        redis_url(url)
    assert ENC not in str(flag_error.value)


def test_redaction_keeps_everything_but_the_password() -> None:
    assert redact(f"redis://app:{ENC}@h:1/0") == "redis://app:***@h:1/0"
    assert redact(f"redis://h:1/0?password={ENC}") == "redis://h:1/0?password=***"
    assert redact(f"unix:///s?db=2&password={ENC}") == "unix:///s?db=2&password=***"
    assert redact(f"redis+cluster://:{ENC}@a:1,b:2") == "redis+cluster://:***@a:1,b:2"
    assert redact("redis://h:1/0") == "redis://h:1/0"
    assert redact(f"rediss://h:1/0?ssl_ca_certs=/ca.pem&password={ENC}") == (
        "rediss://h:1/0?ssl_ca_certs=/ca.pem&password=***"
    )
    # Malformed URLs (what error messages show) leak nothing either.
    assert redact("redis://:pa/ss@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://:pa?ss@h:1/0") == "redis://:***"  # ambiguous: hidden whole
    assert "sec" not in redact("redis://h:1/0?password=sec&ret=1")
    assert redact("redis://h:1/0?password=a@b") == "redis://h:***"
    assert redact("redis://u:p@h/0?db=2&username=me") == "redis://u:***@h/0?db=2&username=me"


def test_each_client_is_given_the_same_credentials() -> None:
    from services.ranking.redis_client import ClusterPipelinedRedis, PipelinedRedis

    url = f"redis://app@h:1/3?password={ENC}"
    fast = PipelinedRedis(url, 1.0)
    assert (fast._host, fast._port, fast._db, fast._username, fast._password) == ("h", 1, 3, "app", SECRET)
    unix = PipelinedRedis(f"unix:///run/r.sock?db=4&password={ENC}", 1.0)
    assert (unix._scheme, unix._path, unix._db, unix._password) == ("unix", "/run/r.sock", 4, SECRET)
    node = ClusterPipelinedRedis(f"rediss+cluster://a:1?password={ENC}", 1.0).node(("b", 2))
    assert (node._scheme, node._host, node._port, node._password) == ("rediss", "b", 2, SECRET)
    assert parse(url).redis_kwargs() == {
        "host": "h",
        "port": 1,
        "db": 3,
        "username": "app",
        "password": SECRET,
        "ssl": False,
    }
    assert connection_string(url) == f'h:1,db=3,username="app",password={connection_string_value(SECRET)}'
    tls = f"rediss+cluster://a:1?password={ENC}&ssl_ca_certs=/ca.pem"
    assert (
        connection_string(tls)
        == f'a:1,password={connection_string_value(SECRET)},ssl=true,ssl_ca_certs="/ca.pem"'
    )
    assert ClusterPipelinedRedis(tls, 1.0).node(("b", 2))._cafile == "/ca.pem"
    assert connection_string(f"unix:///run/r.sock?db=4&password={ENC}").startswith(
        'localhost:6379,unix_socket_path="/run/r.sock",db=4,password='
    )


def connection_string_value(text: str) -> str:
    import json

    return json.dumps(text).replace(",", "\\u002c")


def test_the_password_flags_fold_into_every_form_once() -> None:
    from recstack.credentials import resolve_redis_url

    for url in ("redis://h:1/3", "redis://app@h:1/3", "unix:///run/r.sock?db=3", "redis+cluster://a:1,b:2"):
        folded = parse(resolve_redis_url(url, SECRET, None))
        assert folded.password == SECRET and folded == parse(url).with_password(SECRET)
    # A password already in the query counts as given: not silently replaced by the variable's.
    with pytest.raises(UserError, match="already holds a password") as info:
        resolve_redis_url(f"redis://h:1/0?password={ENC}", "other", None)
    assert SECRET not in str(info.value) and ENC not in str(info.value)
