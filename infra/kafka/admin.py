"""Readiness probe and topic set-up for the local Kafka broker, run by ``infra/kafka.sh`` and ``infra/up.sh``.

Ready means: the broker answers metadata, lists itself as an unfenced broker, and every
partition of every existing topic has a leader (so clients that start right after a restart
find their partitions and their group coordinator).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError


def _topic_spec(text: str) -> tuple[str, int]:
    name, _, partitions = text.rpartition(":")
    if not name or not partitions.isdigit() or int(partitions) <= 0:
        raise argparse.ArgumentTypeError(f"expected NAME:PARTITIONS, got {text!r}")
    return name, int(partitions)


def _connect(bootstrap: str, deadline: float) -> KafkaAdminClient:
    from recstack.kafka import kafka_security_from_env

    security = kafka_security_from_env().client_options()  # RECSTACK_KAFKA_*, as the clients read
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return KafkaAdminClient(
                bootstrap_servers=bootstrap,
                client_id="recstack-infra",
                request_timeout_ms=5000,
                bootstrap_timeout_ms=3000,
                **security,
            )
        except (KafkaError, OSError) as exc:
            last_error = exc
            time.sleep(0.5)
    raise TimeoutError(f"no Kafka broker answered at {bootstrap}: {last_error}")


def _wait_for_leaders(admin: KafkaAdminClient, deadline: float) -> None:
    while True:
        try:
            brokers = admin.describe_cluster()["brokers"]
            if brokers and not all(b.get("is_fenced") for b in brokers):
                topics = admin.list_topics()
                remaining_ms = max(1000, int((deadline - time.monotonic()) * 1000))
                admin.wait_for_topics(topics, timeout_ms=remaining_ms)
                return
        except KafkaError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"broker not ready: {exc}") from exc
        if time.monotonic() >= deadline:
            raise TimeoutError("broker answered but lists no unfenced broker")
        time.sleep(0.5)


def _ensure_topics(admin: KafkaAdminClient, wanted: list[tuple[str, int]]) -> None:
    existing = set(admin.list_topics())
    for name, partitions in wanted:
        if name in existing:
            print(f"[kafka] topic {name} exists")
            continue
        try:
            admin.create_topics({name: {"num_partitions": partitions}}, wait_for_metadata=True)
            print(f"[kafka] created topic {name} ({partitions} partitions)")
        except TopicAlreadyExistsError:
            print(f"[kafka] topic {name} exists")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    parser.add_argument("--topic", type=_topic_spec, action="append", default=[], metavar="NAME:PARTITIONS")
    args = parser.parse_args(argv)
    # kafka-python logs every refused connection while the broker starts; the timeout says enough.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)

    deadline = time.monotonic() + args.timeout
    try:
        admin = _connect(args.bootstrap, deadline)
        try:
            _wait_for_leaders(admin, deadline)
            _ensure_topics(admin, args.topic)
        finally:
            admin.close()
    except (TimeoutError, KafkaError) as exc:
        print(f"[kafka] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
