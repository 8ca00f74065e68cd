"""Fixtures for tests against the real Kafka broker and Redis server that `make up` starts.

Every test module here declares ``pytestmark = pytest.mark.integration`` (and tests collected
from this folder get the mark anyway), so ``pytest -m "not integration"`` runs without services.

- ``kafka_bootstrap``: ``"HOST:PORT"`` of a broker that answers metadata (session).
- ``fresh_topic(partitions=6, name=None)``: creates a uniquely named topic, deleted afterwards.
- ``redis_url``: URL of a flushed Redis database reserved for this test.
- ``redis_db(n=0)``: URL of this test's n-th private database (``redis_db(0) == redis_url``).
- ``redis_client``: a ``redis.Redis`` on ``redis_url``.
- ``infra_control``: stop/start/restart the broker and Redis mid-test through ``infra/*.sh``;
  whatever a test stopped is started again when it ends.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

KAFKA_WAIT_S = 60.0
REDIS_WAIT_S = 30.0
# Databases 1..14 are handed out to tests; 15 holds the reservations (so that several pytest
# processes sharing one Redis never get the same database); 0 is left to `make demo` and users.
TEST_DBS = range(1, 15)
LOCK_DB = 15
LOCK_TTL_MS = 30 * 60 * 1000
LOCK_WAIT_S = 120.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


# ---------------------------------------------------------------------------------------- Kafka


def _bootstrap_address() -> str:
    return (
        os.environ.get("RECSTACK_BOOTSTRAP") or f"127.0.0.1:{os.environ.get('RECSTACK_KAFKA_PORT', '9092')}"
    )


def _admin(bootstrap: str):
    from kafka.admin import KafkaAdminClient

    return KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="recstack-tests",
        request_timeout_ms=10_000,
        bootstrap_timeout_ms=5_000,
    )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """``HOST:PORT`` of the broker (RECSTACK_BOOTSTRAP or 127.0.0.1:9092), once it answers metadata."""
    import logging

    from kafka.errors import KafkaError

    bootstrap = _bootstrap_address()
    deadline = time.monotonic() + KAFKA_WAIT_S
    last_error: Exception | None = None
    kafka_logger = logging.getLogger("kafka")
    level = kafka_logger.level
    kafka_logger.setLevel(logging.CRITICAL)  # refused connections while waiting are expected
    try:
        while time.monotonic() < deadline:
            try:
                admin = _admin(bootstrap)
                try:
                    if admin.describe_cluster()["brokers"]:
                        return bootstrap
                finally:
                    admin.close()
            except (KafkaError, OSError) as exc:
                last_error = exc
            time.sleep(1.0)
    finally:
        kafka_logger.setLevel(level)
    pytest.fail(
        f"no Kafka broker answered metadata at {bootstrap} within {KAFKA_WAIT_S:.0f}s ({last_error}): "
        "run `make up` first (or point RECSTACK_BOOTSTRAP at a broker)",
        pytrace=False,
    )


def _topic_slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9-]+", "-", text).strip("-")[:60] or "topic"


@pytest.fixture
def fresh_topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """Factory ``fresh_topic(partitions=6, name=None) -> str``: a new topic, ready to use.

    The name is unique (``test-<test name>-<random>``) unless given, e.g. for a matching DLQ:
    ``topic = fresh_topic(3); dlq = fresh_topic(3, name=f"{topic}.dlq")``. The call returns once
    every partition has a leader; all topics made in the test are deleted at its end.
    """
    created: list[str] = []

    def make(partitions: int = 6, name: str | None = None) -> str:
        topic = name or f"test-{_topic_slug(request.node.name)}-{uuid.uuid4().hex[:8]}"
        admin = _admin(kafka_bootstrap)
        try:
            admin.create_topics({topic: {"num_partitions": partitions}}, wait_for_metadata=True)
        finally:
            admin.close()
        created.append(topic)
        return topic

    yield make

    if created:
        try:
            admin = _admin(kafka_bootstrap)
            try:
                admin.delete_topics(created, timeout_ms=10_000, raise_errors=False)
            finally:
                admin.close()
        except Exception as exc:  # teardown must not mask the test's own outcome
            print(f"warning: could not delete test topics {created}: {exc}")


# ---------------------------------------------------------------------------------------- Redis


def _redis_base() -> tuple[str, int]:
    url = os.environ.get("RECSTACK_REDIS")
    if url:
        parts = urlsplit(url)
        return parts.hostname or "127.0.0.1", parts.port or 6379
    return "127.0.0.1", int(os.environ.get("RECSTACK_REDIS_PORT", "6379"))


@pytest.fixture(scope="session")
def redis_server() -> str:
    """``redis://HOST:PORT`` (no database) of a Redis server that answers PING."""
    import redis

    host, port = _redis_base()
    deadline = time.monotonic() + REDIS_WAIT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        client = redis.Redis(host=host, port=port, socket_timeout=2, socket_connect_timeout=2)
        try:
            if client.ping():
                return f"redis://{host}:{port}"
        except redis.RedisError as exc:
            last_error = exc
        finally:
            client.close()
        time.sleep(0.5)
    pytest.fail(
        f"no Redis answered PING at {host}:{port} within {REDIS_WAIT_S:.0f}s ({last_error}): "
        "run `make up` first (or point RECSTACK_REDIS at a server)",
        pytrace=False,
    )


# Databases reserved by tests running in this process right now. A reservation left behind
# by an earlier test of this process (its Redis was down at teardown) may be taken over.
_ACTIVE_DBS: set[int] = set()
_OWNER = f"{socket.gethostname()}:{os.getpid()}"


@pytest.fixture
def redis_db(redis_server: str) -> Iterator[Callable[[int], str]]:
    """Factory ``redis_db(n=0) -> url``: this test's n-th private database, flushed.

    Each distinct ``n`` reserves one database of 1..14 for the test (waiting if other pytest
    processes on the same Redis hold them all); the same ``n`` returns the same URL. Databases
    are flushed when handed out and when the test ends.
    """
    import redis

    from recstack.redis_url import connect  # the project's one URL parser, as every client uses

    locks = connect(f"{redis_server}/{LOCK_DB}")
    held: dict[int, int] = {}  # n -> database index

    def try_reserve(db: int) -> bool:
        key = f"recstack-tests:db:{db}"
        if locks.set(key, _OWNER, nx=True, px=LOCK_TTL_MS):
            return True
        if locks.get(key) == _OWNER.encode():  # left behind by an earlier test of this process
            locks.set(key, _OWNER, px=LOCK_TTL_MS)
            return True
        return False

    def reserve() -> int:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            for db in TEST_DBS:
                if db not in _ACTIVE_DBS and try_reserve(db):
                    _ACTIVE_DBS.add(db)
                    return db
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"every test database of {redis_server} stays reserved (db {LOCK_DB} holds the locks)"
                )
            time.sleep(0.2)

    def flush(db: int) -> None:
        client = connect(f"{redis_server}/{db}")
        try:
            client.flushdb()
        finally:
            client.close()

    def get(n: int = 0) -> str:
        if n not in held:
            held[n] = reserve()
            flush(held[n])
        return f"{redis_server}/{held[n]}"

    yield get

    for db in held.values():
        _ACTIVE_DBS.discard(db)
        try:
            flush(db)
            key = f"recstack-tests:db:{db}"
            if locks.get(key) == _OWNER.encode():
                locks.delete(key)
        except redis.RedisError:
            pass  # Redis is down (a test stopped it): the next test flushes the database anyway
    locks.close()


@pytest.fixture
def redis_url(redis_db: Callable[[int], str]) -> str:
    """URL of a flushed Redis database reserved for this test, e.g. ``redis://127.0.0.1:6379/3``."""
    return redis_db(0)


@pytest.fixture
def redis_client(redis_url: str):
    """A ``redis.Redis`` (bytes responses) on this test's database ``redis_url``."""
    from recstack.redis_url import connect

    client = connect(redis_url)
    yield client
    client.close()


# ------------------------------------------------------------------------------- infra control


class InfraControl:
    """Stops, starts and restarts the services of `make up` through ``infra/kafka.sh`` and ``infra/redis.sh``.

    Each call returns once the service is down, or up and answering (broker: metadata and a
    leader for every partition; Redis: PING). Only services started by `make up` (found by
    their pid files) can be controlled; otherwise the test is skipped.
    """

    def __init__(self) -> None:
        self._stopped: set[str] = set()
        self._managed = {service: self._status(service) for service in ("kafka", "redis")}

    @staticmethod
    def _script(service: str) -> str:
        return str(REPO_ROOT / "infra" / f"{service}.sh")

    def _status(self, service: str) -> bool:
        result = subprocess.run([self._script(service), "status"], capture_output=True, text=True)
        return result.returncode == 0

    def _run(self, service: str, action: str) -> None:
        if not self._managed[service]:
            pytest.skip(
                f"{service} was not started by `make up` (no live pid file), so tests cannot {action} it"
            )
        result = subprocess.run([self._script(service), action], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(
                f"infra/{service}.sh {action} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        if action == "stop":
            self._stopped.add(service)
        else:
            self._stopped.discard(service)

    def stop_kafka(self) -> None:
        self._run("kafka", "stop")

    def start_kafka(self) -> None:
        self._run("kafka", "start")

    def restart_kafka(self) -> None:
        self._run("kafka", "restart")

    def stop_redis(self) -> None:
        self._run("redis", "stop")

    def start_redis(self) -> None:
        self._run("redis", "start")

    def restart_redis(self) -> None:
        self._run("redis", "restart")

    def kafka_running(self) -> bool:
        return self._status("kafka")

    def redis_running(self) -> bool:
        return self._status("redis")

    def restore(self) -> None:
        """Start again whatever this test stopped."""
        for service in sorted(self._stopped):
            self._run(service, "start")


@pytest.fixture
def infra_control() -> Iterator[InfraControl]:
    """Control of the real broker and Redis for crash and restart tests (see ``InfraControl``)."""
    control = InfraControl()
    yield control
    control.restore()
