"""``recstack chaos``: inject faults into the running stack one after another and report what survived."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from loadtests.chaos.stack import BACKGROUND_PRIORITIES
from recstack.errors import UserError
from recstack.flags import add_flag, non_negative_float, non_negative_int, positive_float, positive_int


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expected a port 1-65535, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1), got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from loadtests.chaos.schedule import FAULTS

    faults = "\n".join(f"  {f.name:<18} {f.title}" for f in FAULTS)
    parser = subparsers.add_parser(
        "chaos",
        help="fault-injection run: crash, hang and restart the parts under traffic; nothing may be lost",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Bring up the local stack (Kafka and Redis through infra/, two stream consumers in one group,\n"
            "two ranking servers behind client-side round robin, a model), keep events flowing into Kafka\n"
            "(with producer duplicates and malformed records) and Rank/Recommend calls coming (open loop),\n"
            "and inject faults one after another. After each one: the features in Redis must equal the\n"
            "truth computed from every distinct valid event published (none lost, none applied twice),\n"
            "the dead-letter topic must hold exactly the malformed records, ranking errors must be ones\n"
            "the contract allows, and p99 must be back under 10 ms within 10 s. Ends with a table, also\n"
            "written to OUT/reliability.md, with OUT/results.json and a timeline plot OUT/timeline.png.\n"
            "Exit status 1 when a check failed.\n\n"
            f"Faults, in the order they run:\n{faults}\n\n"
            "The event-log disk faults mount a small tmpfs and need root; without it they are skipped."
        ),
    )
    add_flag(parser, "--faults", default="all", metavar="LIST",
             help="comma-separated faults to inject (all: every one)")  # fmt: skip
    add_flag(parser, "--quick", default=False, type=None,
             help="shorter quiet phases around each fault (a smoke run)")  # fmt: skip
    add_flag(parser, "--out", default="artifacts/chaos", type=Path, metavar="DIR",
             help="where the report, the raw figures, the plot and every process's log go")  # fmt: skip
    add_flag(parser, "--kafka-port", default=9092, type=_port, metavar="PORT",
             help="port of the local broker that infra/ starts (and restarts)")  # fmt: skip
    add_flag(parser, "--redis-port", default=6379, type=_port, metavar="PORT",
             help="port of the local Redis that infra/ starts (and restarts)")  # fmt: skip
    add_flag(parser, "--redis-db", default=0, type=non_negative_int, metavar="N",
             help="Redis database of the features (keys carry the run's id; nothing is flushed)")  # fmt: skip
    add_flag(parser, "--attribution-redis-db", default=None, type=non_negative_int, metavar="N",
             help="Redis database of the run's attribution consumers (default: --redis-db); one "
                  "attribution group per database: keys a chaos run left there are deleted, others "
                  "refused")  # fmt: skip
    add_flag(parser, "--models", default=None, type=Path, metavar="DIR",
             help="serve a copy of the newest model version in DIR, not a newly trained one")  # fmt: skip
    add_flag(parser, "--train-events", default=20_000, type=positive_int, metavar="N",
             help="synthetic events the small model is trained on (without --models)")  # fmt: skip
    add_flag(parser, "--event-rate", default=400.0, type=positive_float, metavar="PER_S",
             help="events published per second")  # fmt: skip
    add_flag(parser, "--rank-rate", default=40.0, type=positive_float, metavar="PER_S",
             help="Rank calls per second (100 candidates each), open loop")  # fmt: skip
    add_flag(parser, "--recommend-rate", default=10.0, type=positive_float, metavar="PER_S",
             help="Recommend calls per second, open loop")  # fmt: skip
    add_flag(parser, "--dup-share", default=0.05, type=_share, metavar="SHARE",
             help="share of events sent twice (a producer retry)")  # fmt: skip
    add_flag(parser, "--bad-share", default=0.01, type=_share, metavar="SHARE",
             help="malformed records per valid event")  # fmt: skip
    add_flag(parser, "--background-priority", default="idle", choices=BACKGROUND_PRIORITIES,
             help="CPU priority of the stream consumers, the Kafka broker and the event traffic, "
                  "so that on a shared machine they yield the cores to the ranking servers as "
                  "machines of their own would: idle (run only on cores nothing else wants), "
                  "low (niceness 10) or normal (everything alike)")  # fmt: skip
    add_flag(parser, "--settle-s", default=0.0, type=non_negative_float, metavar="S",
             help="extra quiet seconds after each fault (on top of the schedule's)")  # fmt: skip
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import logging
    from dataclasses import replace

    # The clients retry through the injected faults and log every refused connection; the report
    # tells the outcome, and the services' own logs are in OUT/logs.
    logging.getLogger("kafka").setLevel(max(logging.CRITICAL, logging.getLogger().level))

    from loadtests.chaos.schedule import parse_fault_list, plan

    specs = plan(parse_fault_list(args.faults), quick=args.quick)
    if args.settle_s:
        specs = [replace(s, post_s=s.post_s + args.settle_s) for s in specs]
    if args.models is not None and not args.models.exists():
        raise UserError(f"--models {args.models}: no such folder")
    from loadtests.chaos.runner import ChaosConfig, ChaosRun, checks_passed

    config = ChaosConfig(
        out=args.out.resolve(),
        faults=specs,
        kafka_port=args.kafka_port,
        redis_port=args.redis_port,
        redis_db=args.redis_db,
        attribution_db=args.attribution_redis_db,
        models=args.models,
        event_rate=args.event_rate,
        rank_rate=args.rank_rate,
        recommend_rate=args.recommend_rate,
        dup_share=args.dup_share,
        bad_share=args.bad_share,
        train_events=args.train_events,
        quick=args.quick,
        background_priority=args.background_priority,
        command="recstack " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "recstack chaos",
    )
    started = time.monotonic()
    run = ChaosRun(config)
    results = run.run()
    paths = run.write(time.monotonic() - started)
    print()
    print(paths["markdown"].read_text())
    print(f"written: {paths['markdown']}, {paths['json']}, {paths['plot']} (logs in {config.out / 'logs'})")
    print(f"took {(time.monotonic() - started) / 60:.1f} min")
    return 0 if checks_passed(results) else 1
