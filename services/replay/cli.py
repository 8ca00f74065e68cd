"""``recstack replay``: publish events (a data set or an event log) to Kafka."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recstack.errors import UserError
from recstack.flags import add_flag, host_port, non_negative_float, non_negative_int
from recstack.kafka import add_kafka_security_flags, kafka_security_from_args

NAMED_SOURCES = ("onlineretail", "otto", "synthetic", "synthetic-storefront")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="publish events (Online Retail, OTTO, synthetic or an event log) to Kafka",
        description=(
            "Publish storefront events to Kafka, keyed by user_id, in time order: a named data set "
            "or a JSON Lines / Parquet event log (a file or a folder of them)."
        ),
    )
    add_flag(
        parser,
        "--source",
        default="onlineretail",
        metavar="onlineretail|otto|synthetic|synthetic-storefront|PATH",
        help="what to publish",
    )
    add_flag(
        parser,
        "--rate",
        default=0.0,
        type=non_negative_float,
        metavar="EVENTS_PER_S",
        help="events per second (0: as fast as possible)",
    )
    add_flag(
        parser,
        "--limit",
        default=0,
        type=non_negative_int,
        metavar="N",
        help="publish at most N events (0: all)",
    )
    add_flag(
        parser,
        "--bootstrap",
        default="127.0.0.1:9092",
        type=host_port,
        metavar="HOST:PORT",
        help="Kafka bootstrap server",
    )
    add_flag(parser, "--topic", default="user-events", metavar="NAME", help="topic to publish to")
    add_flag(
        parser, "--seed", default=0, type=non_negative_int, metavar="N", help="seed of the synthetic source"
    )
    add_flag(parser, "--no-progress", default=False, type=None, help="no progress bar")
    add_kafka_security_flags(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    source = args.source
    if source not in NAMED_SOURCES and not Path(source).exists():
        raise UserError(
            f"--source {source!r}: no such file or folder (give onlineretail, otto, synthetic, "
            "synthetic-storefront, or the "
            "path of a JSON Lines or Parquet event log)"
        )
    security = kafka_security_from_args(args)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    from recstack.sources import load_source
    from services.replay.publisher import frame_to_events, publish

    frame = load_source(source, limit=args.limit or None, seed=args.seed)
    if frame.empty:
        raise UserError(f"--source {source!r} holds no events")
    stats = publish(
        frame_to_events(frame),
        total=len(frame),
        bootstrap=args.bootstrap,
        topic=args.topic,
        rate=args.rate,
        progress=not args.no_progress,
        security=security,
    )
    print(
        f"published {stats.events} events to {args.topic} in {stats.seconds:.1f} s "
        f"({stats.events_per_s:,.0f} events/s)"
    )
    return 0
