"""Kafka with SASL/SCRAM: a second local broker (the project's ``infra/kafka.sh`` with
``RECSTACK_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT``, its own ports and state directory) that
only talks to an authenticated user. ``recstack replay`` publishes to it, ``recstack stream``
consumes from it and dead-letters to it, all configured by the ``RECSTACK_KAFKA_*`` variables
alone, and the password never reaches their output. Clients without the password are refused.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MECHANISM = "SCRAM-SHA-256"
USER = "recstack-stream"
PASSWORD = "scram-" + os.urandom(6).hex()
WAIT_S = 180.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _client_env(password: str = PASSWORD) -> dict[str, str]:
    return {
        **os.environ,
        "RECSTACK_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "RECSTACK_KAFKA_SASL_MECHANISM": MECHANISM,
        "RECSTACK_KAFKA_SASL_USERNAME": USER,
        "RECSTACK_KAFKA_SASL_PASSWORD": password,
    }


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory) -> Iterator[str]:
    port = _free_port()
    env = {
        **_client_env(),
        "RECSTACK_RUN_DIR": str(tmp_path_factory.mktemp("kafka-sasl")),
        "RECSTACK_KAFKA_PORT": str(port),
        "RECSTACK_KAFKA_CONTROLLER_PORT": str(_free_port()),
        "RECSTACK_KAFKA_HEAP": "256m",
    }
    script = str(REPO / "infra" / "kafka.sh")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    assert PASSWORD not in started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=120)


def _admin(bootstrap: str, password: str = PASSWORD, bootstrap_timeout_ms: int = 30_000):
    from kafka.admin import KafkaAdminClient

    return KafkaAdminClient(
        bootstrap_servers=bootstrap,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=MECHANISM,
        sasl_plain_username=USER,
        sasl_plain_password=password,
        bootstrap_timeout_ms=bootstrap_timeout_ms,
    )


def _read_all(bootstrap: str, topic: str) -> list:
    """Every record of ``topic``, read over SCRAM."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=MECHANISM,
        sasl_plain_username=USER,
        sasl_plain_password=PASSWORD,
    )
    try:
        return list(consumer)
    finally:
        consumer.close()


def test_plaintext_clients_are_refused(sasl_broker):
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    with pytest.raises(KafkaError):
        KafkaAdminClient(bootstrap_servers=sasl_broker, bootstrap_timeout_ms=3_000)
    with pytest.raises(KafkaError):
        _admin(sasl_broker, password="wrong", bootstrap_timeout_ms=3_000)


def test_replay_and_stream_over_scram(sasl_broker, redis_url, tmp_path):
    import redis
    from kafka import KafkaProducer

    from services.stream.keys import applied_key

    topic = "sasl-events"
    admin = _admin(sasl_broker)
    admin.create_topics(
        {topic: {"num_partitions": 2}, f"{topic}.dlq": {"num_partitions": 1}}, wait_for_metadata=True
    )
    admin.close()

    env = _client_env()
    replay = subprocess.run(
        [sys.executable, "-m", "recstack.cli", "replay", "--source", "synthetic", "--limit", "300",
         "--bootstrap", sasl_broker, "--topic", topic, "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "published 300 events" in replay.stdout
    producer = KafkaProducer(
        bootstrap_servers=sasl_broker,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=MECHANISM,
        sasl_plain_username=USER,
        sasl_plain_password=PASSWORD,
    )
    producer.send(topic, key=b"x", value=b"{not json", partition=0).get(60)
    producer.close()

    log_path = tmp_path / "stream.log"
    with open(log_path, "w") as log_file:
        stream = subprocess.Popen(
            [sys.executable, "-m", "recstack.cli", "stream", "--bootstrap", sasl_broker, "--redis", redis_url,
             "--topic", topic, "--dlq-topic", f"{topic}.dlq", "--group", "sasl-group", "--event-log", "",
             "--metrics-port", "0"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            applied = {int(p): int(o) for p, o in client.hgetall(applied_key(topic)).items()}
            if sum(o + 1 for o in applied.values()) == 301:
                break
            assert stream.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"applied offsets {applied}; log:\n{log_path.read_text()}"
            time.sleep(0.2)
    finally:
        stream.terminate()
        stream.wait(60)
        client.close()
    assert stream.returncode == 0, log_path.read_text()
    assert PASSWORD not in log_path.read_text()

    # The dead-letter producer authenticated too: the malformed record is in the DLQ.
    records = _read_all(sasl_broker, f"{topic}.dlq")
    assert [r.value for r in records] == [b"{not json"]


def test_ranking_impressions_over_scram_and_refused_without_the_password(sasl_broker, caplog):
    """The ranking server's impressions producer (librdkafka) speaks the same SCRAM settings;
    with a wrong password nothing is published and every impression is counted as failed."""

    from recstack.kafka import KafkaSecurity
    from services.ranking.impressions import ImpressionPublisher, kafka_producer_factory
    from services.ranking.metrics import RankingMetrics

    topic = "sasl-impressions"
    admin = _admin(sasl_broker)
    admin.create_topics({topic: {"num_partitions": 2}}, wait_for_metadata=True)
    admin.close()

    def publish(password: str, n: int, delivery_timeout_ms: int) -> RankingMetrics:
        security = KafkaSecurity("SASL_PLAINTEXT", MECHANISM, USER, password)
        metrics = RankingMetrics()
        factory = kafka_producer_factory(sasl_broker, security, 5, delivery_timeout_ms=delivery_timeout_ms)
        publisher = ImpressionPublisher(factory, topic, metrics=metrics, close_timeout_s=30)
        publisher.start()
        publisher.offer_many(
            (f"{password[:4]}{k:028x}", f"u{k}", "A", "v1", ["i1", "i2"], 1_700_000_000_000, "")
            for k in range(n)
        )
        publisher.stop()
        return metrics

    good = publish(PASSWORD, 50, 60_000)
    assert good.value("recstack_impressions_published_total") == 50
    bad = publish("wrong-password", 20, 5_000)
    assert bad.value("recstack_impressions_published_total") == 0
    assert bad.value("recstack_impressions_failed_total") == 20  # counted, never lost silently
    assert PASSWORD not in caplog.text and "wrong-password" not in caplog.text

    import json

    ids = sorted(json.loads(r.value)["request_id"] for r in _read_all(sasl_broker, topic))
    assert ids == sorted(f"{PASSWORD[:4]}{k:028x}" for k in range(50))
