"""A Redis that requires a password: the stream consumer, Feast and the ranking fast path all
authenticate with it, and a wrong or missing password stops start-up with an error that names
the setting to fix and never shows the password.

The server is the project's own ``infra/redis.sh`` with ``RECSTACK_REDIS_PASSWORD`` set, on a
free port with its own state directory, so the shared test Redis is not touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import grpc
import pytest
import redis

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
# Characters that break naive URL building (':', '@', '/', '%') and Feast's connection string
# (',' and '='). A password Feast would JSON-decode into a number or a bool (12345, true) is
# checked against Feast's own parser in tests/unit/test_security_config.py.
PASSWORD = 'p@ss:w/rd,1=2%"x'

WAIT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PasswordRedis:
    def __init__(self, run_dir: Path, password: str) -> None:
        self.port = _free_port()
        self.password = password
        self.env = {
            **os.environ,
            "RECSTACK_RUN_DIR": str(run_dir),
            "RECSTACK_REDIS_PORT": str(self.port),
            "RECSTACK_REDIS_PASSWORD": password,
        }

    def script(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(REPO_ROOT / "infra" / "redis.sh"), action],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    @property
    def bare_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def url(self, password: str | None = None) -> str:
        return f"redis://:{quote(password or self.password, safe='')}@127.0.0.1:{self.port}/0"


def _started(tmp_path_factory, password: str) -> Iterator[PasswordRedis]:
    server = PasswordRedis(tmp_path_factory.mktemp("redis-auth"), password)
    started = server.script("start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert password not in started.stdout + started.stderr
    try:
        yield server
    finally:
        server.script("stop")


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory) -> Iterator[PasswordRedis]:
    yield from _started(tmp_path_factory, PASSWORD)


def test_the_server_refuses_clients_without_the_password(password_redis):
    client = redis.Redis.from_url(password_redis.bare_url, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        client.ping()
    client.close()
    config = Path(password_redis.env["RECSTACK_RUN_DIR"]) / "redis" / "redis.conf"
    assert config.stat().st_mode & 0o077 == 0, "the config file holds the password: owner only"
    assert redis.Redis.from_url(password_redis.url()).ping()


def _stream_command(bootstrap: str, redis_url: str, topic: str, event_log: Path) -> list[str]:
    return [
        sys.executable, "-m", "recstack.cli", "stream",
        "--bootstrap", bootstrap, "--redis", redis_url, "--group", f"g-{topic}", "--topic", topic,
        "--dlq-topic", f"{topic}.dlq", "--event-log", str(event_log), "--metrics-port", "0",
        "--log-roll-s", "1",
    ]  # fmt: skip


def test_stream_feast_and_ranking_work_with_the_password(
    password_redis, kafka_bootstrap, fresh_topic, tmp_path
):
    from kafka import KafkaProducer
    from test_ranking_server import ITEMS, ServerThread, publish_model

    from feature_store.reads import read_features
    from feature_store.store import open_store
    from recstack.events import Event
    from recstack.v1 import ranking_pb2
    from services.ranking.config import RankingConfig

    topic = fresh_topic(3)
    fresh_topic(3, name=f"{topic}.dlq")
    # The consumer gets the password from RECSTACK_REDIS_PASSWORD, the URL has none.
    env = {**os.environ, "RECSTACK_REDIS_PASSWORD": password_redis.password}
    log_path = tmp_path / "stream.log"
    run = uuid.uuid4().hex[:8]
    with open(log_path, "w") as log_file:
        consumer = subprocess.Popen(
            _stream_command(kafka_bootstrap, password_redis.bare_url, topic, tmp_path / "events"),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        now = int(time.time() * 1000)
        for k in range(30):
            event = Event(f"e-{run}-{k}", "shopper", ITEMS[k % 3], "view", now - 1000 + k)
            producer.send(topic, key=b"shopper", value=event.to_json_bytes())
        producer.flush(30)
        producer.close()

        client = redis.Redis.from_url(password_redis.url())
        deadline = time.monotonic() + WAIT_S
        while True:
            (user,), _ = read_features(client, ["shopper"], [])
            if user is not None and user.views == 30:
                break
            assert consumer.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the consumer did not apply the events"
            time.sleep(0.2)
        client.close()
    finally:
        consumer.terminate()
        consumer.wait(60)
    output = log_path.read_text()
    assert consumer.returncode == 0, output
    assert password_redis.password not in output
    assert quote(password_redis.password, safe="") not in output

    # Feast's own reader, through the connection string built from the URL.
    store = open_store(password_redis.url(), tmp_path / "feast")
    users = store.get_online_features(
        features=["user_activity:views"], entity_rows=[{"user_id": "shopper"}]
    ).to_dict()
    assert users["views"] == [30]

    # The ranking fast path (its own Redis client) reads the features, not degraded, with the
    # password in the query this time (it used to ignore ?password= and answer degraded).
    models = tmp_path / "models"
    models.mkdir()
    publish_model(models, "v20240101-000000", seed=1)
    server = ServerThread(
        RankingConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            models_dir=models,
            redis_url=f"{password_redis.bare_url}?password={quote(password_redis.password, safe='')}",
            model_poll_interval_s=0.1,
            max_queue_wait_ms=0.0,
            redis_timeout_ms=2000.0,
        )
    )
    try:
        deadline = time.monotonic() + WAIT_S
        reply = None
        while reply is None:
            try:
                reply = server.stub.Rank(
                    ranking_pb2.RankRequest(user_id="shopper", item_ids=ITEMS[:20]), timeout=30
                )
            except grpc.RpcError as exc:  # UNAVAILABLE until the model is loaded
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
                time.sleep(0.1)
        assert not reply.degraded
        assert len(reply.items) == 20
    finally:
        server.close()


def _cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recstack.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


SERVE = ["serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
STREAM = ["stream", "--bootstrap", "127.0.0.1:1", "--metrics-port", "0", "--event-log", ""]


# Each case starts real processes (a few seconds each): every way in is covered, not every pair.
@pytest.mark.parametrize(
    ("how", "commands"),
    [
        ("wrong", [SERVE, STREAM]),
        ("missing", [SERVE]),
        ("wrong-in-url", [SERVE]),
        ("wrong-in-file", [SERVE]),
    ],
)
def test_a_bad_password_stops_start_up_naming_the_setting(password_redis, tmp_path, how, commands):
    wrong = "not-the-" + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSTACK_REDIS")}
    url = password_redis.bare_url
    extra: list[str] = []
    if how == "wrong":
        env["RECSTACK_REDIS_PASSWORD"] = wrong
    elif how == "wrong-in-url":
        url = password_redis.url(wrong)
    elif how == "wrong-in-file":
        secret = tmp_path / "redis-password"
        secret.write_text(wrong + "\n")
        extra = ["--redis-password-file", str(secret)]
    for command in commands:
        if command is SERVE:
            command = [*command, "--models", str(tmp_path)]
        result = _cli([*command, "--redis", url, *extra], env)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert "refused the credentials" in output
        assert "RECSTACK_REDIS_PASSWORD" in output and "--redis-password-file" in output
        assert wrong not in output
        assert password_redis.password not in output
        assert "Traceback" not in output
