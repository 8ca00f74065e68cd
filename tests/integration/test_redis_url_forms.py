"""Every accepted Redis URL form, against a real password-protected Redis server and Redis Cluster,
through every client recstack has: redis-py (``recstack.redis_url.connect``, what the stream
consumer and the tests use), the ranking fast path (``PipelinedRedis`` / ``ClusterPipelinedRedis``),
Feast's own ``get_online_features`` (``feature_store.store.open_store``) and the stream consumer
itself; and no log line or error message shows the password.

The server is ``infra/redis.sh`` (with ``RECSTACK_REDIS_SOCKET`` for the ``unix://`` forms) and the
cluster ``infra/redis-cluster.sh`` with ``RECSTACK_REDIS_CLUSTER_PASSWORD``, both on free ports with
their own state directories: the shared test Redis and cluster are not touched.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from test_redis_password import PASSWORD, PasswordRedis, _free_port

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
ACL_USER = "recstack-app"
ACL_PASSWORD = "acl,p@ss=1%"
DB = 5  # not 0: every form must select the database it names
WAIT_S = 120.0
Q = lambda text: quote(text, safe="")  # noqa: E731


# ------------------------------------------------------------------------------ the servers


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[PasswordRedis]:
    """A password-protected redis-server on a free port and a Unix socket, with an ACL user."""
    run_dir = tmp_path_factory.mktemp("redis-forms")
    srv = PasswordRedis(run_dir, PASSWORD)
    srv.socket = run_dir / "redis.sock"
    srv.env["RECSTACK_REDIS_SOCKET"] = str(srv.socket)
    srv.tls_port = _free_port()
    srv.env["RECSTACK_REDIS_TLS_PORT"] = str(srv.tls_port)
    srv.ca = run_dir / "redis" / "tls" / "ca.crt"  # the private CA infra/redis.sh makes
    started = srv.script("start")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        # The reference client: redis-py's own keyword arguments, no URL parsing of ours.
        admin = redis.Redis(host="127.0.0.1", port=srv.port, password=PASSWORD)
        admin.acl_setuser(
            ACL_USER, enabled=True, passwords=[f"+{ACL_PASSWORD}"], keys="*", commands=["+@all"]
        )
        admin.close()
        yield srv
    finally:
        srv.script("stop")


@pytest.fixture(scope="module")
def feast_dir(tmp_path_factory) -> Path:
    """One Feast registry for the module (applying it is the slow part of opening a store)."""
    return tmp_path_factory.mktemp("feast")


def single_forms(srv: PasswordRedis) -> dict[str, str]:
    port, sock, tls, ca = srv.port, srv.socket, srv.tls_port, srv.ca
    return {
        "password": f"redis://:{Q(PASSWORD)}@127.0.0.1:{port}/{DB}",
        "user-password": f"redis://{ACL_USER}:{Q(ACL_PASSWORD)}@127.0.0.1:{port}/{DB}",
        "query-password": f"redis://127.0.0.1:{port}/{DB}?password={Q(PASSWORD)}",
        "query-user-password": f"redis://127.0.0.1:{port}/{DB}?username={ACL_USER}&password={Q(ACL_PASSWORD)}",
        "unix-query": f"unix://{sock}?db={DB}&password={Q(PASSWORD)}",
        "unix-userinfo": f"unix://:{Q(PASSWORD)}@{sock}?db={DB}",
        "tls-password": f"rediss://:{Q(PASSWORD)}@127.0.0.1:{tls}/{DB}?ssl_ca_certs={ca}",
        "tls-user-query-password": f"rediss://{ACL_USER}@127.0.0.1:{tls}/{DB}?password={Q(ACL_PASSWORD)}"
        f"&ssl_ca_certs={ca}",
    }


def secret_of(form: str) -> str:
    return (
        ACL_PASSWORD
        if form in ("user-password", "query-user-password", "tls-user-query-password")
        else PASSWORD
    )


SINGLE_FORMS = [
    "password",
    "user-password",
    "query-password",
    "query-user-password",
    "unix-query",
    "unix-userinfo",
    "tls-password",
    "tls-user-query-password",
]


def _seed(client, user: str, views: int) -> None:
    from feature_store.values import ItemFeatures, UserFeatures
    from feature_store.writes import write_features

    write_features(
        client,
        users={user: UserFeatures(views=views, purchases=1, recent_items=["i1"])},
        items={"i1": ItemFeatures(views=7, category="c1")},
        written_at_ms=1_700_000_000_000,
    )


def _no_secret(text: str) -> None:
    for secret in (PASSWORD, ACL_PASSWORD):
        assert secret not in text and Q(secret) not in text, text


@pytest.mark.parametrize("form", SINGLE_FORMS)
def test_every_single_server_form_through_every_client(server, form, feast_dir, caplog):
    from feature_store.reads import read_features
    from feature_store.store import open_store
    from recstack.credentials import redact_url
    from recstack.redis_url import connect
    from services.ranking.redis_client import PipelinedRedis

    caplog.set_level(logging.DEBUG)
    url = single_forms(server)[form]
    user = f"u-{form}"

    # redis-py, as the stream consumer and the tests' helpers build it.
    client = connect(url, socket_timeout=5)
    assert client.ping()
    _seed(client, user, views=11)
    client.close()
    # It wrote into database DB of this server (checked without our URL parser).
    reference = redis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD, db=DB)
    (seen,), _ = read_features(reference, [user], [])
    assert seen is not None and seen.views == 11
    reference.close()

    # The ranking fast path.
    fast = PipelinedRedis(url, 5.0)
    try:
        (got,), (item,) = read_features(fast, [user], ["i1"])
        assert got is not None and got.views == 11 and item is not None and item.views == 7
    finally:
        fast.close()

    # Feast's own reader, through the connection string recstack builds from the URL.
    store = open_store(url, feast_dir)
    rows = store.get_online_features(features=["user_activity:views"], entity_rows=[{"user_id": user}])
    assert rows.to_dict()["views"] == [11]

    _no_secret(redact_url(url))
    _no_secret(caplog.text)


@pytest.mark.parametrize("form", SINGLE_FORMS)
def test_a_wrong_password_in_every_form_is_refused_without_showing_it(server, form):
    from recstack.credentials import check_redis_auth
    from recstack.errors import UserError
    from recstack.redis_url import connect
    from services.ranking.redis_client import PipelinedRedis

    good = single_forms(server)[form]
    secret = secret_of(form)
    wrong_secret = "wr0ng-" + uuid.uuid4().hex
    url = good.replace(Q(secret), Q(wrong_secret))
    assert url != good
    with pytest.raises(redis.AuthenticationError) as caught:
        connect(url, socket_timeout=5, retry=Retry(NoBackoff(), 0)).ping()  # refused: no retries
    assert wrong_secret not in str(caught.value)
    fast = PipelinedRedis(url, 5.0)
    with pytest.raises(redis.AuthenticationError) as caught:
        fast.ping()
    assert wrong_secret not in str(caught.value)
    fast.close()
    with pytest.raises(UserError) as refused:
        check_redis_auth(url)
    assert "refused the credentials" in str(refused.value)
    assert wrong_secret not in str(refused.value) and Q(wrong_secret) not in str(refused.value)


def _stream_command(bootstrap: str, redis_url: str, topic: str, event_log: Path) -> list[str]:
    return [
        sys.executable, "-m", "recstack.cli", "--log-level", "DEBUG", "stream",
        "--bootstrap", bootstrap, "--redis", redis_url, "--group", f"g-{topic}", "--topic", topic,
        "--dlq-topic", f"{topic}.dlq", "--event-log", str(event_log), "--metrics-port", "0",
        "--log-roll-s", "1",
    ]  # fmt: skip


def _run_consumer(bootstrap: str, fresh_topic, url: str, read_client, tmp_path: Path, n: int = 12) -> str:
    """Run ``recstack stream --redis url`` until it applied ``n`` events of one user; its output."""
    from kafka import KafkaProducer

    from feature_store.reads import read_features
    from recstack.events import Event

    topic = fresh_topic(3)
    fresh_topic(3, name=f"{topic}.dlq")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSTACK_REDIS")}
    log_path = tmp_path / "stream.log"
    user = f"shopper-{uuid.uuid4().hex[:6]}"
    with open(log_path, "w") as log_file:
        consumer = subprocess.Popen(
            _stream_command(bootstrap, url, topic, tmp_path / "events"),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        now = int(time.time() * 1000)
        for k in range(n):
            event = Event(f"e-{user}-{k}", user, f"i{k % 3}", "view", now - 1000 + k)
            producer.send(topic, key=user.encode(), value=event.to_json_bytes())
        producer.flush(30)
        producer.close()
        deadline = time.monotonic() + WAIT_S
        while True:
            (got,), _ = read_features(read_client, [user], [])
            if got is not None and got.views == n:
                break
            assert consumer.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, (
                "the consumer did not apply the events:\n" + log_path.read_text()
            )
            time.sleep(0.2)
    finally:
        consumer.terminate()
        consumer.wait(60)
    output = log_path.read_text()
    assert consumer.returncode == 0, output
    return output


def test_the_consumer_with_a_query_password_applies_events_and_never_logs_it(
    server, kafka_bootstrap, fresh_topic, tmp_path
):
    url = single_forms(server)["query-password"]
    reference = redis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD, db=DB)
    output = _run_consumer(kafka_bootstrap, fresh_topic, url, reference, tmp_path)
    reference.close()
    assert "consuming" in output and f"127.0.0.1:{server.port}/{DB}" in output  # the URL is logged...
    _no_secret(output)  # ...without its password


# ------------------------------------------------------------------------------ Redis Cluster


def _free_base_port() -> int:
    """A port P with P..P+2 and their cluster bus ports (+10000) free."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + 2 + 10000 > 65535:
            continue
        try:
            for port in (base, base + 1, base + 2, base + 10000, base + 10001, base + 10002):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports for a private Redis Cluster")


class PasswordCluster:
    def __init__(self, run_dir: Path) -> None:
        self.port = _free_base_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RECSTACK_REDIS")},
            "RECSTACK_RUN_DIR": str(run_dir),
            "RECSTACK_REDIS_CLUSTER_PORT": str(self.port),
            "RECSTACK_REDIS_CLUSTER_PASSWORD": PASSWORD,
        }

    def script(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(REPO_ROOT / "infra" / "redis-cluster.sh"), action],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    def forms(self) -> dict[str, str]:
        p, secret = self.port, Q(PASSWORD)
        return {
            "cluster-password": f"redis+cluster://:{Q(PASSWORD)}@127.0.0.1:{p},127.0.0.1:{p + 1}",
            "cluster-user-password": f"redis+cluster://default:{Q(PASSWORD)}@127.0.0.1:{p + 2}/0",
            "cluster-query-password": f"redis+cluster://127.0.0.1:{p},127.0.0.1:{p + 2}?password={secret}",
        }


@pytest.fixture(scope="module")
def password_cluster(tmp_path_factory) -> Iterator[PasswordCluster]:
    cluster = PasswordCluster(tmp_path_factory.mktemp("cluster-forms"))
    started = cluster.script("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        _no_secret(started.stdout + started.stderr)
        yield cluster
    finally:
        cluster.script("stop")


def test_the_cluster_script_requires_the_password(password_cluster):
    from redis.cluster import ClusterNode, RedisCluster

    node = redis.Redis(host="127.0.0.1", port=password_cluster.port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        node.ping()
    node.close()
    conf = Path(password_cluster.env["RECSTACK_RUN_DIR"]) / "redis-cluster" / str(password_cluster.port)
    assert (conf / "redis.conf").stat().st_mode & 0o077 == 0, "the config file holds the password"
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", password_cluster.port)], password=PASSWORD)
    assert len(client.get_primaries()) == 3
    client.close()


@pytest.mark.parametrize("form", ["cluster-password", "cluster-user-password", "cluster-query-password"])
def test_every_cluster_form_through_every_client(password_cluster, form, feast_dir, caplog):
    from feature_store.reads import read_features
    from feature_store.store import open_store
    from recstack.credentials import redact_url
    from recstack.redis_url import connect
    from services.ranking.redis_client import ClusterPipelinedRedis

    caplog.set_level(logging.DEBUG)
    url = password_cluster.forms()[form]
    users = [f"{form}-{k}" for k in range(8)]  # spread over the three masters

    client = connect(url, socket_timeout=5)
    assert len(client.get_primaries()) == 3
    for k, user in enumerate(users):
        _seed(client, user, views=20 + k)
    client.close()

    fast = ClusterPipelinedRedis(url, 5.0)
    try:
        got, (item,) = read_features(fast, users, ["i1"])
        assert [u.views if u else None for u in got] == [20 + k for k in range(8)]
        assert item is not None and item.views == 7
    finally:
        fast.close()

    store = open_store(url, feast_dir)
    rows = store.get_online_features(
        features=["user_activity:views"], entity_rows=[{"user_id": u} for u in users]
    ).to_dict()
    assert rows["views"] == [20 + k for k in range(8)]

    _no_secret(redact_url(url))
    _no_secret(caplog.text)


def test_the_consumer_on_a_cluster_with_a_query_password(
    password_cluster, kafka_bootstrap, fresh_topic, tmp_path
):
    from redis.cluster import ClusterNode, RedisCluster

    url = password_cluster.forms()["cluster-query-password"]
    reference = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", password_cluster.port)], password=PASSWORD
    )
    output = _run_consumer(kafka_bootstrap, fresh_topic, url, reference, tmp_path)
    reference.close()
    _no_secret(output)
