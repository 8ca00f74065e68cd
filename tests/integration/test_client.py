"""``recstack.client`` against a real ranking server (token and TLS on) and the real broker.

The server runs in this process on its own event loop (``test_ranking_server``'s ServerThread);
the clients connect to it over TLS with a certificate openssl makes for the test, and send the
bearer token the server requires. The publisher's events go to a fresh topic and through a real
stream consumer into Redis; the features read back must equal the offline truth
(``loadtests.chaos.truth``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from test_ranking_server import ITEMS, V1, ServerThread, publish_model
from test_stream_exactly_once import _config, applied_records, consumer_thread, wait_until

from recstack.client import (
    AsyncRankingClient,
    EventPublisher,
    RankingClient,
    RankingError,
    RetryPolicy,
    in_request_order,
)
from services.ranking.config import RankingConfig

pytestmark = pytest.mark.integration

TOKEN = "client-test-token"
# Long backoffs for the restart test: gRPC draws each wait at random below the backoff, so these
# keep the attempts spread over seconds, past the moment the server is back.
SLOW_RETRY = RetryPolicy(max_attempts=5, initial_backoff_s=1.0, max_backoff_s=5.0, multiplier=2.0)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # openssl is installed by `make test` (infra/tools.sh): without it this test fails, never skips.
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
         str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
         "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def server_factory(redis_url: str, tmp_path: Path, certificate: tuple[Path, Path]):
    models = tmp_path / "models"
    models.mkdir()
    publish_model(models, V1, seed=1)
    servers: list[ServerThread] = []
    cert, key = certificate

    def start(port: int = 0) -> ServerThread:
        config = RankingConfig(
            host="127.0.0.1",
            port=port,
            metrics_port=0,
            models_dir=models,
            redis_url=redis_url,
            max_queue_wait_ms=0.0,
            redis_timeout_ms=2000.0,
            auth_token=TOKEN,
            tls_cert=cert,
            tls_key=key,
        )
        server = ServerThread(config)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if not server.loop.is_closed():  # a test may have stopped it already
            server.close()


def _client(server: ServerThread, cert: Path, **kwargs) -> RankingClient:
    kwargs.setdefault("token", TOKEN)
    return RankingClient(f"localhost:{server.port}", root_certificates=cert, deadline_s=30, **kwargs)


def test_token_over_tls_is_accepted_and_a_missing_token_refused(server_factory, certificate):
    cert, _ = certificate
    server = server_factory()
    with _client(server, cert) as client:
        got = client.rank("u1", ITEMS[:5], top_k=3)
        assert got.model_version == V1 and len(got.items) == 3 and not got.fallback
        assert {i.item_id for i in got.items} <= set(ITEMS[:5])
        assert [i.score for i in got.items] == sorted((i.score for i in got.items), reverse=True)
        assert len(client.recommend("u1", k=4).items) == 4
    # Without the token, even with a fallback: a refused call is a misconfiguration, never hidden.
    with _client(server, cert, token=None, fallback=in_request_order) as client:
        with pytest.raises(RankingError) as err:
            client.rank("u1", ITEMS[:5])
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED

    async def run_async() -> list[str]:
        async with AsyncRankingClient(
            f"localhost:{server.port}", root_certificates=cert, token=TOKEN, deadline_s=30
        ) as client:
            return (await client.rank("u1", ITEMS[:5])).item_ids

    assert sorted(asyncio.run(run_async())) == sorted(ITEMS[:5])


def test_a_token_is_never_sent_in_clear_beyond_loopback():
    with pytest.raises(ValueError, match="TLS"):
        RankingClient("10.1.2.3:50051", token=TOKEN)


def test_a_call_made_while_the_server_restarts_succeeds_without_the_caller_retrying(
    server_factory, certificate
):
    cert, _ = certificate
    server = server_factory()
    port = server.port
    server.close()  # nothing listens on the port now: a first attempt is refused
    with _client(server, cert, strict=True) as strict:
        with pytest.raises(RankingError) as err:
            strict.rank("u1", ITEMS[:5])
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    result: list = []
    with _client(server, cert, retries=SLOW_RETRY) as client:
        call = threading.Thread(target=lambda: result.append(client.rank("u1", ITEMS[:5])))
        started = time.monotonic()
        call.start()
        time.sleep(0.5)  # the first attempt has failed by now
        server_factory(port=port)
        call.join(60)
    assert result and result[0].model_version == V1 and not result[0].fallback
    assert time.monotonic() - started > 0.5


def test_deadline_exceeded_answers_the_fallback_and_strict_mode_raises(server_factory, certificate):
    cert, _ = certificate
    server = server_factory()
    # A deadline no call can meet: the first answer needs a TLS handshake first.
    with _client(server, cert, fallback=in_request_order) as client:
        got = client.rank("u1", ITEMS[:6], top_k=4, deadline_s=0.000_1)
    assert got.fallback and got.item_ids == ITEMS[:4]
    assert got.error is not None and got.error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with _client(server, cert, strict=True) as client:
        with pytest.raises(RankingError) as err:
            client.rank("u1", ITEMS[:6], deadline_s=0.000_1)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert not client.rank("u1", ITEMS[:6]).fallback  # the same client with time enough
    with pytest.raises(ValueError, match="strict"):
        RankingClient("127.0.0.1:1", strict=True, fallback=in_request_order)

    async def run_async():
        async with AsyncRankingClient(
            f"localhost:{server.port}", root_certificates=cert, token=TOKEN, fallback=in_request_order
        ) as client:
            return await client.rank("u1", ITEMS[:3], deadline_s=0.000_1)

    got = asyncio.run(run_async())
    assert got.fallback and got.item_ids == ITEMS[:3]
    assert got.error is not None and got.error.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_ten_thousand_published_events_land_exactly_as_the_truth_expects(
    kafka_bootstrap, fresh_topic, redis_url, redis_client, tmp_path
):
    from test_stream_exactly_once import HALF_LIFE_S

    from feature_store.reads import read_features
    from loadtests.chaos.truth import Acked, compare, expected_features
    from recstack.sources import synthetic
    from services.replay.publisher import frame_to_events

    topic = fresh_topic()
    fresh_topic(partitions=1, name=f"{topic}.dlq")
    frame = synthetic(10_000, n_users=300, n_items=200, seed=7)
    frame["event_id"] = frame["event_id"] + f"-{os.getpid()}-{time.monotonic_ns()}"
    acked: list[Acked] = []
    lock = threading.Lock()

    def on_ack(event, meta) -> None:
        with lock:
            acked.append(Acked(meta.partition, meta.offset, event))

    with EventPublisher(kafka_bootstrap, topic) as publisher:
        for event in frame_to_events(frame):
            publisher.publish(event).add_callback(lambda meta, event=event: on_ack(event, meta))
    assert len(acked) == 10_000
    with consumer_thread(_config(kafka_bootstrap, redis_url, topic, tmp_path / "log")):
        wait_until(lambda: applied_records(redis_client, topic) >= 10_000, 120, "10,000 records applied")
    users, items = expected_features(acked, HALF_LIFE_S)
    got_users, got_items = read_features(redis_client, list(users), list(items))
    check = compare(
        users, items, dict(zip(users, got_users, strict=True)), dict(zip(items, got_items, strict=True))
    )
    assert check.events == 10_000 and check.ok, check.summary()


def test_flush_raises_the_sends_the_broker_refused(kafka_bootstrap, fresh_topic):
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    from recstack.client import PublishError

    topic = fresh_topic(partitions=1)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:  # the broker refuses any batch over 1 KB on this topic
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": "1024"})])
    finally:
        admin.close()
    publisher = EventPublisher(kafka_bootstrap, topic, linger_ms=0)
    try:
        publisher.publish({"event_id": "ok", "user_id": "u", "item_id": "i", "event_type": "view", "ts": 1})
        publisher.flush()  # a small record is accepted
        publisher.publish_raw(b"u", b"x" * 4096)
        with pytest.raises(PublishError) as err:
            publisher.flush()
        assert len(err.value.errors) == 1 and topic in str(err.value)
        publisher.flush()  # each failure is raised once
    finally:
        publisher.close()


def test_the_open_loop_generator_sends_its_prepared_bytes_over_tls_with_the_token(
    server_factory, certificate
):
    from loadtests.openloop import GeneratorConfig, OpenLoopGenerator
    from loadtests.stats import summarize_step
    from recstack.v1 import ranking_pb2

    cert, _ = certificate
    server = server_factory()
    requests = [ranking_pb2.RankRequest(user_id="u1", item_ids=ITEMS[:20]).SerializeToString()]
    for token, expect in ((TOKEN, {}), (None, {"UNAUTHENTICATED": 20})):
        settings = {"root_certificates": str(cert), "token": token}
        config = GeneratorConfig(workers=1, channels=1, timeout_s=10.0, client_settings=settings)
        with OpenLoopGenerator(f"localhost:{server.port}", "Rank", requests, config) as load:
            step = summarize_step(load.run_step(20.0, 1.0, "uniform"), offered_rate=20.0, duration_s=1.0)
        assert step["errors"] == expect
        assert step["ok"] == 20 - sum(expect.values())
