"""``recstack stream``: run the consumer that turns events into features until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from recstack.credentials import add_redis_auth_flags, check_redis_auth, resolve_redis_args
from recstack.flags import (
    add_flag,
    duration_s,
    host_port,
    non_negative_int,
    positive_float,
    positive_int,
    redis_url,
)
from recstack.kafka import add_kafka_security_flags, kafka_security_from_args
from services.stream.config import StreamConfig

_DEFAULTS = StreamConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stream",
        help="consume user events from Kafka into the Feast/Redis features, exactly once",
        description=(
            "Consume storefront events from Kafka, validate them (malformed ones go to the dead-letter "
            "topic), apply each valid event exactly once to the Feast/Redis features, append it to the "
            "Parquet event log, and serve Prometheus metrics. Runs until SIGTERM/SIGINT, then finishes "
            "its batch, commits and leaves the consumer group."
        ),
    )
    d = _DEFAULTS
    add_flag(
        parser,
        "--bootstrap",
        default=d.bootstrap,
        type=host_port,
        metavar="HOST:PORT",
        help="Kafka bootstrap server",
    )
    add_flag(
        parser,
        "--redis",
        default=d.redis,
        type=redis_url,
        metavar="URL",
        help="Redis URL of the online store (redis://[user:password@]host:port/db)",
    )
    add_redis_auth_flags(parser)
    add_flag(parser, "--group", default=d.group, metavar="NAME", help="Kafka consumer group")
    add_flag(parser, "--topic", default=d.topic, metavar="NAME", help="topic of the events")
    add_flag(
        parser,
        "--dlq-topic",
        default=d.dlq_topic,
        metavar="NAME",
        help="dead-letter topic for malformed events",
    )
    add_flag(
        parser,
        "--event-log",
        default=d.event_log,
        metavar="DIR",
        help="folder of the Parquet event log (date=YYYY-MM-DD/part-*.parquet); empty turns it off",
    )
    add_flag(
        parser,
        "--dedup-window-s",
        default=d.dedup_window_s,
        type=positive_int,
        metavar="S",
        help="an event_id seen again within this many seconds has no effect",
    )
    add_flag(
        parser,
        "--trending-half-life-s",
        default=d.trending_half_life_s,
        type=positive_float,
        metavar="S",
        help="half-life of the items' trending score, in event time",
    )
    add_flag(
        parser,
        "--max-future-skew",
        default=d.max_future_skew,
        type=duration_s,
        metavar="DURATION",
        help=(
            "events whose ts is more than this far ahead of the consumer's clock go to the dead-letter "
            "topic, in seconds (or with a unit: 90s, 5m, 1h)"
        ),
    )
    add_flag(
        parser,
        "--metrics-port",
        default=d.metrics_port,
        type=non_negative_int,
        metavar="PORT",
        help="Prometheus metrics port (0 turns it off)",
    )
    add_flag(
        parser,
        "--metrics-host",
        default=d.metrics_host,
        metavar="ADDRESS",
        help="address of the metrics endpoint (0.0.0.0: every interface, as in a container)",
    )
    add_flag(
        parser,
        "--max-batch",
        default=d.max_batch,
        type=positive_int,
        metavar="N",
        help="most records per poll, applied in one atomic Redis write",
    )
    add_flag(
        parser,
        "--poll-timeout-ms",
        default=d.poll_timeout_ms,
        type=positive_int,
        metavar="MS",
        help="longest wait for records in one poll",
    )
    add_flag(
        parser,
        "--log-roll-s",
        default=d.log_roll_s,
        type=positive_float,
        metavar="S",
        help="close an event-log part file (and commit offsets) after this many seconds",
    )
    add_flag(
        parser,
        "--log-roll-rows",
        default=d.log_roll_rows,
        type=positive_int,
        metavar="N",
        help="close an event-log part file after this many events",
    )
    add_flag(
        parser,
        "--eventlog-max-unwritten",
        default=d.eventlog_max_unwritten,
        type=positive_int,
        metavar="N",
        help=(
            "while the event log cannot be written (disk full, read-only), pause consuming once this "
            "many events wait in memory, and resume when a roll succeeds; features stop updating meanwhile"
        ),
    )
    add_flag(
        parser,
        "--session-timeout-ms",
        default=d.session_timeout_ms,
        type=positive_int,
        metavar="MS",
        help="how soon the group reassigns the partitions of a consumer that died",
    )
    add_flag(parser, "--client-id", default=d.client_id, metavar="NAME", help="Kafka client id")
    add_kafka_security_flags(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    # Checked before anything heavy is imported.
    config = dataclasses.replace(
        StreamConfig.from_namespace(args),
        redis=resolve_redis_args(args),
        kafka_security=kafka_security_from_args(args),
    )
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    check_redis_auth(config.redis)  # before the heavy imports: a wrong password fails at once
    from services.stream.consumer import run

    return run(config)
