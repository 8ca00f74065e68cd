"""``recstack attribute``: run the attribution consumer until SIGTERM/SIGINT (docs/EXPERIMENTS.md)."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from recstack.credentials import add_redis_auth_flags, check_redis_auth, resolve_redis_args
from recstack.flags import add_flag, duration_s, host_port, non_negative_int, positive_int, redis_url
from recstack.kafka import add_kafka_security_flags, kafka_security_from_args
from services.attribution.config import AttributionConfig

_D = AttributionConfig()

# flag, config field, type, metavar, help
_FLAGS = (
    ("--bootstrap", "bootstrap", host_port, "HOST:PORT", "Kafka bootstrap server"),
    (
        "--redis",
        "redis",
        redis_url,
        "URL",
        "Redis URL where the per-arm metrics are kept (one Redis, no cluster)",
    ),
    ("--group", "group", str, "NAME", "Kafka consumer group"),
    ("--impressions-topic", "impressions_topic", str, "NAME", "topic of the ranking server's impressions"),
    ("--events-topic", "events_topic", str, "NAME", "topic of the storefront events (as many partitions)"),
    (
        "--window",
        "window_s",
        duration_s,
        "DURATION",
        "event time after an impression during which events are credited to it",
    ),
    (
        "--lateness",
        "lateness_s",
        duration_s,
        "DURATION",
        "how far out of ts order impressions of a partition may arrive",
    ),
    (
        "--max-wait",
        "max_wait_s",
        duration_s,
        "DURATION",
        "longest an event waits for the impressions to reach its ts",
    ),
    ("--max-per-user", "max_per_user", positive_int, "N", "impressions kept per user, newest first"),
    (
        "--state-ttl",
        "state_ttl_s",
        duration_s,
        "DURATION",
        "a user's impressions expire this long after the last one",
    ),
    ("--max-held", "max_held", positive_int, "N", "events held per partition before its events are paused"),
    ("--metrics-port", "metrics_port", non_negative_int, "PORT", "Prometheus metrics port (0 turns it off)"),
    ("--metrics-host", "metrics_host", str, "ADDRESS", "address of the metrics endpoint"),
    ("--max-batch", "max_batch", positive_int, "N", "most records per poll"),
    ("--poll-timeout-ms", "poll_timeout_ms", positive_int, "MS", "longest wait for records in one poll"),
    (
        "--session-timeout-ms",
        "session_timeout_ms",
        positive_int,
        "MS",
        "how soon a dead member's partitions move",
    ),
    ("--client-id", "client_id", str, "NAME", "Kafka client id"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attribute",
        help="credit storefront events to the ranking impressions they followed: per-arm online metrics",
        description=(
            "Join the ranking server's impressions (rank-impressions) with the storefront events "
            "(user-events): each event is credited to the impression it followed (its request_id, or "
            "the latest impression of that user holding the item within --window of event time), and "
            "the per-arm counters (impressions, add-to-cart, purchases, reciprocal ranks, revenue, per "
            "minute) are kept in Redis exactly once and served as Prometheus metrics."
        ),
    )
    for flag, name, kind, metavar, text in _FLAGS:
        add_flag(parser, flag, default=getattr(_D, name), type=kind, metavar=metavar, help=text)
    add_redis_auth_flags(parser)
    add_kafka_security_flags(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    values = {name: getattr(args, flag[2:].replace("-", "_")) for flag, name, *_ in _FLAGS}
    config = dataclasses.replace(
        AttributionConfig(**values),
        redis=resolve_redis_args(args),
        kafka_security=kafka_security_from_args(args),
    )
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    check_redis_auth(config.redis)
    from services.attribution.consumer import run

    return run(config)
