"""``recstack loadtest``, ``recstack bench`` and ``recstack slo-gate``.

The handlers import only Locust-free modules: Locust runs in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
from pathlib import Path
from typing import Any

from recstack.errors import UserError
from recstack.flags import (
    add_flag,
    host_port,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    redis_url,
)
from recstack.kafka import add_kafka_security_flags, kafka_security_from_args

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(text: str) -> float:
    """``90``, ``90s``, ``1.5m``, ``500ms`` -> seconds (> 0)."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 60s, 2m or 500ms, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def rate_list(text: str) -> tuple[float, ...]:
    """``25,50,100,200`` -> rising positive rates in calls/s."""
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rates such as 25,50,100,200, got {text!r}") from None
    if not rates or any(r <= 0 for r in rates) or any(b <= a for a, b in zip(rates, rates[1:], strict=False)):
        raise argparse.ArgumentTypeError(
            f"expected positive rising rates such as 25,50,100,200, got {text!r}"
        )
    return rates


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def register(subparsers: Any) -> None:
    _register_loadtest(subparsers)
    _register_bench(subparsers)
    _register_slo_gate(subparsers)
    from loadtests import storefront  # its heavy imports wait for its handler

    storefront.register(subparsers)


# --- shared flags --------------------------------------------------------------------------------


def _add_generator_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--schedule",
        default="poisson",
        choices=["poisson", "uniform"],
        help="arrival schedule of the open-loop generator",
    )
    add_flag(parser, "--workers", default=2, type=positive_int, help="generator processes")
    add_flag(
        parser,
        "--channels",
        default=4,
        type=positive_int,
        help="gRPC channels (TCP connections) per generator process",
    )
    add_flag(
        parser,
        "--timeout-ms",
        default=1000.0,
        type=positive_float,
        help="per-call deadline; a call unanswered by then counts as DEADLINE_EXCEEDED",
    )
    add_flag(parser, "--candidates", default=100, type=positive_int, help="candidates per Rank request")
    add_flag(
        parser,
        "--source",
        default="onlineretail",
        help="where users and items come from: onlineretail | otto | synthetic | an event log path",
    )
    add_flag(parser, "--seed", default=0, type=int, help="seed of the request mix and of the schedules")


def _generator_config(args: argparse.Namespace) -> Any:
    from loadtests.openloop import GeneratorConfig

    return GeneratorConfig(workers=args.workers, channels=args.channels, timeout_s=args.timeout_ms / 1000.0)


# --- recstack loadtest ---------------------------------------------------------------------------


def _register_loadtest(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "loadtest",
        help="storefront user journeys with Locust (headless), CSV and HTML reports",
        description=(
            "Run Locust headless in its own process: shoppers who call Recommend on the home page, Rank "
            "50-200 items on category pages and a few on product pages, and publish their events to Kafka. "
            "Writes locust_stats.csv (and the other --csv files), locust.html and summary.md to --out."
        ),
    )
    add_flag(parser, "--host", default="127.0.0.1:50051", type=host_port, help="ranking server HOST:PORT")
    add_flag(parser, "--users", default=20, type=positive_int, help="simulated shoppers")
    add_flag(parser, "--spawn-rate", default=5.0, type=positive_float, help="shoppers started per second")
    add_flag(parser, "--duration", default=60.0, type=duration, help="how long to run (e.g. 60s, 5m)")
    add_flag(parser, "--out", default="artifacts/loadtest", help="folder for the reports")
    add_flag(parser, "--bootstrap", default="127.0.0.1:9092", help="Kafka HOST:PORT for the shoppers' events")
    add_flag(parser, "--topic", default="user-events", help="Kafka topic for events")
    add_flag(parser, "--no-events", type=None, default=False, help="publish no events to Kafka")
    add_flag(parser, "--wait", default="0.2,1.0", help="think time between pages, MIN,MAX seconds")
    add_flag(parser, "--timeout-ms", default=1000.0, type=positive_float, help="per-call gRPC deadline")
    add_flag(parser, "--source", default="onlineretail", help="where shoppers and items come from")
    add_flag(parser, "--processes", default=1, type=positive_int, help="Locust processes (forked by Locust)")
    add_kafka_security_flags(parser)
    parser.set_defaults(handler=_loadtest)


def _loadtest(args: argparse.Namespace) -> int:
    from loadtests.locust_runner import LocustRun, run_locust

    try:
        low, high = (float(x) for x in args.wait.split(","))
    except ValueError:
        raise UserError(f"--wait: expected MIN,MAX seconds, got {args.wait!r}") from None
    if not 0 <= low <= high:
        raise UserError(f"--wait: need 0 <= MIN <= MAX, got {args.wait!r}")
    # The Locust process reads the Kafka settings from its environment (secrets stay off its argv).
    os.environ.update(kafka_security_from_args(args).environment())
    run = LocustRun(
        host=args.host,
        users=args.users,
        spawn_rate=args.spawn_rate,
        duration_s=args.duration,
        out=Path(args.out),
        bootstrap="" if args.no_events else args.bootstrap,
        topic=args.topic,
        source=args.source,
        wait=f"{low:g},{high:g}",
        timeout_s=args.timeout_ms / 1000.0,
        processes=args.processes,
    )
    return run_locust(run)


# --- recstack bench ------------------------------------------------------------------------------


def _register_bench(subparsers: Any) -> None:
    from loadtests.saturation import DEFAULT_SERVERS, SERVER_NAMES

    parser = subparsers.add_parser(
        "bench",
        help="saturation benchmark: echo vs naive vs real server, open loop, in one run",
        description=(
            "Start each server in its own process on a free port (the bare gRPC echo server, "
            "'recstack serve --naive' and 'recstack serve'), offer Rank calls at fixed rates (--rates, then "
            "x--step-factor) until throughput saturates, each step long enough for --min-calls calls, bisect "
            "above the highest rate within the SLO, then overload the real server at --overload-factor times "
            "that rate. Every step also reads the server's and the generator's CPU time per call from /proc. "
            "Requests name returning shoppers (--min-recent-items in --redis). The ranking servers need a "
            "model in --models and features in --redis (see docs/LOADTESTS.md). Writes results.json, "
            "summary.md and PNG plots to --out. Schedule flags left unset take the full or the --quick "
            "defaults; --quick figures are indicative only, the targets are judged by a full run."
        ),
    )
    add_flag(parser, "--out", default="artifacts/bench", help="folder for results.json, summary.md and plots")
    add_flag(
        parser,
        "--servers",
        default=list(DEFAULT_SERVERS),
        nargs="+",
        choices=list(SERVER_NAMES),
        help="servers to measure, in this order; real-w2 is 'recstack serve --workers 2' (two processes "
        "on one port), to compare with real (one)",
    )
    add_flag(parser, "--models", default="artifacts/models", help="model folder for the ranking servers")
    add_flag(
        parser,
        "--redis",
        default="redis://127.0.0.1:6379/0",
        type=redis_url,
        help="Redis holding the features, for the ranking servers",
    )
    add_flag(
        parser, "--serve-args", default="", help="extra flags for both 'recstack serve' runs (one string)"
    )
    for name in SERVER_NAMES:
        add_flag(
            parser,
            f"--{name}-cmd",
            default="",
            help=f"command that starts the {name} server instead of the built-in one; '{{port}}' is "
            "replaced by the port to bind",
        )
    add_flag(
        parser,
        "--quick",
        type=None,
        default=False,
        help="short steps with few calls, for make demo: indicative figures only",
    )
    add_flag(parser, "--p99-ms", default=10.0, type=positive_float, help="latency SLO: p99 bound in ms")
    add_flag(
        parser, "--max-error-rate", default=0.01, type=fraction, help="SLO: highest share of failed calls"
    )
    add_flag(
        parser,
        "--rates",
        default=None,
        type=rate_list,
        help="the first fixed steps' offered rates, calls/s, rising (default 25,50,100,200); a miss at "
        "any of them up to a rate means that rate is not within the SLO",
    )
    add_flag(
        parser,
        "--step-factor",
        default=None,
        type=positive_float,
        help="past the last of --rates, each fixed step is this multiple of the one before (full: 1.5, "
        "quick: 2)",
    )
    add_flag(
        parser,
        "--min-calls",
        default=None,
        type=positive_int,
        help="calls per step at least: a step lasts max(--step-duration, MIN_CALLS / rate) (full: 500, "
        "quick: 100)",
    )
    add_flag(
        parser,
        "--step-duration",
        default=None,
        type=duration,
        help="shortest length of one step (full: 5s, quick: 1.5s)",
    )
    add_flag(
        parser,
        "--max-steps",
        default=None,
        type=positive_int,
        help="most fixed steps per server (full: 16, quick: 9)",
    )
    add_flag(
        parser,
        "--fine-steps",
        default=None,
        type=non_negative_int,
        help="bisection steps above the highest rate within the SLO (full: 3, quick: 1)",
    )
    add_flag(
        parser,
        "--min-recent-items",
        default=20,
        type=non_negative_int,
        help="Rank requests name only users with at least this many recent items in --redis (returning "
        "shoppers); 0: any warm user of --source, unchecked",
    )
    add_flag(
        parser,
        "--min-users",
        default=50,
        type=positive_int,
        help="fewest returning shoppers the run needs; with fewer it stops before any server starts",
    )
    add_flag(
        parser,
        "--max-rate",
        default=20_000.0,
        type=positive_float,
        help="never offer more than this, calls/s",
    )
    add_flag(
        parser,
        "--overload-factor",
        default=1.5,
        type=positive_float,
        help="overload step at this multiple of the real server's highest rate within the SLO",
    )
    add_flag(
        parser,
        "--start-timeout",
        default=180.0,
        type=duration,
        help="how long a server may take to be healthy",
    )
    add_flag(
        parser, "--request-pool", default=2000, type=positive_int, help="distinct prepared Rank requests"
    )
    _add_experiment_flags(parser)
    _add_generator_flags(parser)
    parser.set_defaults(handler=_bench)


def version_list(text: str) -> tuple[str, ...]:
    """``vA,vB[,vC]`` -> the versions of arms A, B and the shadow."""
    versions = tuple(part.strip() for part in text.split(",") if part.strip())
    if len(versions) not in (2, 3):
        raise argparse.ArgumentTypeError(
            f"expected two or three versions such as vA,vB[,vShadow], got {text!r}"
        )
    return versions


def _add_experiment_flags(parser: argparse.ArgumentParser) -> None:
    """What experiments cost (docs/LOADTESTS.md, 'Experiments'); off by default."""
    add_flag(
        parser,
        "--experiments",
        type=None,
        default=False,
        help="after the servers, run the real server at --experiment-rate-fraction of its SLO rate in "
        "interleaved rounds: no experiment, an A/B experiment, A/B plus a shadow arm (needs "
        "--kafka-bootstrap and the real server)",
    )
    add_flag(
        parser,
        "--experiment-ladder",
        type=None,
        default=False,
        help="also run the real server's whole ladder with the A/B experiment on (real-ab in the report)",
    )
    add_flag(
        parser,
        "--kafka-bootstrap",
        default="",
        help="Kafka for the experiment servers' impressions, HOST:PORT",
    )
    add_flag(
        parser,
        "--impressions-topic",
        default="rank-impressions",
        help="topic the experiment servers publish impressions to (it must exist)",
    )
    add_flag(
        parser,
        "--experiment-versions",
        default=(),
        type=version_list,
        help="versions of --models for arms A,B[,shadow] (default: two copies of the served version in "
        "a private folder of --out)",
    )
    add_flag(
        parser, "--experiment-rounds", default=2, type=positive_int, help="rounds of each experiment state"
    )
    add_flag(
        parser, "--experiment-min-calls", default=500, type=positive_int, help="calls per round at least"
    )
    add_flag(
        parser,
        "--experiment-rate-fraction",
        default=0.5,
        type=fraction,
        help="the rounds' offered rate, as a share of the real server's SLO rate",
    )
    add_flag(
        parser,
        "--experiment-rate",
        default=0.0,
        type=non_negative_float,
        help="the rounds' offered rate in calls/s, instead of --experiment-rate-fraction of the SLO rate "
        "(for a machine where the ladder finds none); 0: from the ladder",
    )


def bench_config(args: argparse.Namespace) -> Any:
    """The :class:`loadtests.saturation.BenchConfig` that ``recstack bench ARGS`` runs."""
    from dataclasses import replace

    from loadtests.saturation import QUICK_SEARCH, BenchConfig, SearchConfig

    base = QUICK_SEARCH if args.quick else SearchConfig()
    overrides = {
        "rates": args.rates,
        "step_factor": args.step_factor,
        "min_calls": args.min_calls,
        "step_s": args.step_duration,
        "max_fixed_steps": args.max_steps,
        "fine_steps": args.fine_steps,
    }
    try:
        search = replace(
            base,
            **{k: v for k, v in overrides.items() if v is not None},
            max_rate=args.max_rate,
            slo_p99_ms=args.p99_ms,
            max_error_rate=args.max_error_rate,
            schedule=args.schedule,
        )
    except ValueError as exc:
        raise UserError(f"recstack bench: {exc}") from None
    cfg = BenchConfig(
        out=Path(args.out),
        servers=tuple(args.servers),
        models=args.models,
        redis=args.redis,
        serve_args=tuple(shlex.split(args.serve_args)),
        candidates=args.candidates,
        source=args.source,
        request_pool=args.request_pool,
        min_recent_items=args.min_recent_items,
        min_users=args.min_users,
        overload_factor=args.overload_factor,
        start_timeout_s=args.start_timeout,
        seed=args.seed,
        quick=args.quick,
        search=search,
        generator=_generator_config(args),
        experiments=args.experiments,
        experiment_ladder=args.experiment_ladder,
        kafka_bootstrap=args.kafka_bootstrap,
        impressions_topic=args.impressions_topic,
        experiment_versions=tuple(args.experiment_versions),
        experiment_rounds=args.experiment_rounds,
        experiment_min_calls=args.experiment_min_calls,
        experiment_rate_fraction=args.experiment_rate_fraction,
        experiment_rate=args.experiment_rate,
    )
    if (cfg.experiments or cfg.experiment_ladder) and not cfg.kafka_bootstrap:
        raise UserError(
            "recstack bench: --experiments and --experiment-ladder need --kafka-bootstrap (impressions on)"
        )
    if (cfg.experiments or cfg.experiment_ladder) and "real" not in cfg.servers:
        raise UserError(
            "recstack bench: --experiments and --experiment-ladder need the real server in --servers"
        )
    if cfg.experiment_rate_fraction <= 0:
        raise UserError("recstack bench: --experiment-rate-fraction must be above 0")
    return cfg


def interrupt_on_sigterm() -> None:
    """SIGTERM (``kill``, a job's timeout) unwinds like Ctrl-C, so the ``finally`` blocks run: the
    servers started are stopped and the bench's experiment in Redis is ended. (Python's default
    for SIGTERM ends the process at once, leaving the experiment running for every server that
    reads that Redis.)"""

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def _bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from loadtests.saturation import run_bench, server_specs

    cfg = bench_config(args)
    commands = {name: getattr(args, f"{name.replace('-', '_')}_cmd") for name in cfg.servers}
    if (
        any(name != "echo" and not commands.get(name) for name in cfg.servers)
        and not Path(cfg.models).is_dir()
    ):
        raise UserError(f"--models {cfg.models} is not a folder: train a model first (see docs/LOADTESTS.md)")
    if cfg.experiments or cfg.experiment_ladder:  # before any server: a long run must not fail at its end
        from loadtests.experiment_bench import ExperimentBenchError, check_topic

        try:
            check_topic(cfg.kafka_bootstrap, cfg.impressions_topic)
        except ExperimentBenchError as exc:
            raise UserError(str(exc)) from None
    interrupt_on_sigterm()
    specs = server_specs(cfg)
    for name, command in commands.items():
        if command:
            specs[name] = replace(specs[name], argv=tuple(shlex.split(command)))
    results = run_bench(cfg, specs=specs)
    print((cfg.out / "summary.md").read_text())
    failed = [name for name, server in results["servers"].items() if server.get("status") != "ok"]
    if (results.get("experiments") or {}).get("status") == "failed":
        failed.append("the experiment rounds")
    if failed:
        print(f"recstack bench: could not measure {', '.join(failed)} (see summary.md)")
        return 1
    return 0


# --- recstack slo-gate ---------------------------------------------------------------------------


def _register_slo_gate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "slo-gate",
        help="offer a fixed rate to a running server; exit 1 when p99 or errors exceed the SLO",
        description=(
            "One open-loop step at --rate for --duration against a running ranking server (after a short "
            "warm-up). Prints p50/p95/p99/p99.9, throughput, error and path mix; exits 0 when p99 of "
            "successful calls <= --p99-ms and the share of failed calls <= --max-error-rate, else 1."
        ),
    )
    add_flag(parser, "--target", default="127.0.0.1:50051", type=host_port, help="ranking server HOST:PORT")
    add_flag(parser, "--rate", default=None, type=positive_float, required=True, help="offered rate, calls/s")
    add_flag(parser, "--duration", default=10.0, type=duration, help="length of the measured step")
    add_flag(parser, "--p99-ms", default=10.0, type=positive_float, help="p99 bound in ms")
    add_flag(parser, "--max-error-rate", default=0.01, type=fraction, help="highest share of failed calls")
    add_flag(
        parser, "--warmup", default=1.0, type=non_negative_float, help="warm-up seconds before measuring"
    )
    add_flag(parser, "--method", default="rank", choices=["rank", "recommend"], help="which RPC to call")
    add_flag(parser, "--k", default=20, type=positive_int, help="k of Recommend requests")
    add_flag(parser, "--json", default="", help="also write the figures to this JSON file")
    _add_generator_flags(parser)
    parser.set_defaults(handler=_slo_gate)


def _slo_gate(args: argparse.Namespace) -> int:
    from loadtests import workload
    from loadtests.openloop import GeneratorError
    from loadtests.slo_gate import Gate, format_gate, run_gate

    gate = Gate(
        target=args.target,
        rate=args.rate,
        duration_s=args.duration,
        p99_ms=args.p99_ms,
        max_error_rate=args.max_error_rate,
        warmup_s=args.warmup,
        method="Rank" if args.method == "rank" else "Recommend",
        schedule=args.schedule,
        seed=args.seed,
    )
    mix = workload.load(args.source)
    if gate.method == "Rank":
        requests = workload.rank_requests(mix, 2000, args.candidates, args.seed)
    else:
        requests = workload.recommend_requests(mix, 2000, args.k, args.seed)
    try:
        step = run_gate(gate, requests, _generator_config(args))
    except GeneratorError as exc:
        raise UserError(f"cannot load {args.target}: {exc}") from None
    print(format_gate(gate, step))
    if args.json:
        step.pop("histogram_ms", None)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"gate": vars(gate), "step": step}, indent=1))
    return 0 if step["passed"] else 1
