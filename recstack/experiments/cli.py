"""``recstack experiment start | status | promote | stop``: run an A/B (and shadow) experiment.

The state goes to Redis (:mod:`.state`), where every ranking replica reads it within a second;
``promote`` also points the models folder's ``DEFAULT`` at the winning arm's version
(:func:`models.artifacts.write_default`), which hot reload serves to everyone.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from recstack.credentials import add_redis_auth_flags, resolve_redis_args
from recstack.errors import UserError
from recstack.flags import add_flag, redis_url

_ARM_RE = re.compile(r"^(?P<name>[^=]+)=(?P<version>[^:]+)(?::(?P<share>.+))?$")


def parse_arm(text: str, *, shadow: bool = False) -> Any:
    """``NAME=VERSION:SHARE`` (a live arm; the share a fraction 0-1 or a percentage ``50%``), or
    ``NAME=VERSION`` (a shadow arm)."""
    from recstack.experiments.assign import Arm

    flag = "--shadow" if shadow else "--arm"
    m = _ARM_RE.match(text.strip())
    if m is None:
        form = "NAME=VERSION" if shadow else "NAME=VERSION:SHARE"
        example = "C=v20240103-000000" if shadow else "A=v20240102-000000:0.5"
        raise UserError(f"{flag} {text!r}: expected {form}, e.g. {example}")
    name, version, share_text = m.group("name").strip(), m.group("version").strip(), m.group("share")
    if shadow:
        if share_text is not None:
            raise UserError(f"{flag} {text!r}: a shadow arm takes no traffic share; give NAME=VERSION")
        return Arm(name, version, 0.0, shadow=True)
    if share_text is None:
        raise UserError(f"{flag} {text!r}: the traffic share is missing (NAME=VERSION:SHARE, e.g. A=v1:0.5)")
    share_text = share_text.strip()
    try:
        share = float(share_text[:-1]) / 100.0 if share_text.endswith("%") else float(share_text)
    except ValueError:
        raise UserError(f"{flag} {text!r}: share {share_text!r} is not a number") from None
    if not 0.0 < share <= 1.0:
        raise UserError(f"{flag} {text!r}: share must be in (0, 1] (or a percentage), got {share_text}")
    return Arm(name, version, share)


def _client(args: argparse.Namespace) -> Any:
    from recstack.credentials import check_redis_auth
    from recstack.redis_url import connect

    url = resolve_redis_args(args)
    check_redis_auth(url)
    return connect(url, socket_timeout=5.0, socket_connect_timeout=5.0)


def _check_versions(models_dir: Path, arms: list[Any]) -> None:
    """Every arm's version is a complete folder whose manifest verifies: the servers would refuse
    it otherwise (and serve that arm's users the default version)."""
    from models.artifacts import ArtifactError, list_versions, verify_manifest

    if not models_dir.is_dir():
        raise UserError(f"--models {models_dir}: not a folder (the servers' models folder)")
    names = {p.name for p in list_versions(models_dir)}
    for arm in arms:
        flag = "--shadow" if arm.shadow else "--arm"
        if arm.version not in names:
            raise UserError(
                f"{flag} {arm.name}: version {arm.version!r} is not a complete version in {models_dir}"
            )
        try:
            verify_manifest(models_dir / arm.version)
        except ArtifactError as exc:
            raise UserError(f"{flag} {arm.name}: version {arm.version} would be refused: {exc}") from None


def cmd_start(args: argparse.Namespace) -> int:
    from recstack.experiments import state
    from recstack.experiments.assign import InvalidExperiment

    if not args.arm:
        raise UserError("--arm: give at least one live arm, NAME=VERSION:SHARE (shares summing to 1)")
    arms = [parse_arm(a) for a in args.arm] + [parse_arm(s, shadow=True) for s in args.shadow or ()]
    if not args.skip_version_check:
        _check_versions(Path(args.models), arms)
    try:
        experiment = state.new_experiment(args.name, arms, args.salt)
        client = _client(args)
        stored = state.write(client, experiment)
    except InvalidExperiment as exc:
        raise UserError(str(exc)) from None
    print(f"experiment {stored.name} started (generation {stored.generation}): {stored.assignment!r}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from recstack.experiments import state
    from recstack.experiments.assign import InvalidExperiment

    try:
        current = state.read(_client(args))
    except InvalidExperiment as exc:
        raise UserError(f"the stored experiment state is invalid: {exc}") from None
    if args.json:
        print(json.dumps(None if current is None else current.to_dict(), indent=2))
        return 0
    if current is None:
        print("no experiment has run: every request is served by the default version")
        return 0
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(current.started_at / 1000))
    if current.active:
        print(f"experiment {current.name}: running since {started} (generation {current.generation})")
    else:
        ended = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime((current.ended_at or 0) / 1000))
        how = f"promoted arm {current.promoted}" if current.promoted else "stopped"
        print(f"no experiment running; the last, {current.name}, ran {started} to {ended} and was {how}")
    print(f"  salt {current.salt}")
    for arm in current.arms:
        kind = "shadow" if arm.shadow else f"{arm.share:.1%} of users"
        print(f"  arm {arm.name}: version {arm.version}, {kind}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from models.artifacts import ArtifactError, write_default
    from recstack.experiments import state
    from recstack.experiments.assign import InvalidExperiment

    client = _client(args)
    try:
        current = state.read(client)
        if current is None or not current.active:
            raise UserError("promote: no experiment is running (recstack experiment status)")
        arm = current.arm(args.arm)
    except InvalidExperiment as exc:
        raise UserError(f"promote: {exc}") from None
    # The pointer first: the arm's users keep its version throughout, and when the experiment
    # ends everyone is already on the new default.
    try:
        write_default(Path(args.models), arm.version)
    except ArtifactError as exc:
        raise UserError(f"promote {arm.name}: {exc}") from None
    try:
        state.end(client, promoted=arm.name)
    except InvalidExperiment as exc:
        raise UserError(
            f"promote: DEFAULT now names {arm.version}, but ending the experiment failed: {exc}"
        ) from None
    pointer = Path(args.models) / "DEFAULT"
    print(f"promoted arm {arm.name}: {pointer} names {arm.version}; experiment {current.name} ended")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from recstack.experiments import state
    from recstack.experiments.assign import InvalidExperiment

    try:
        ended = state.end(_client(args))
    except InvalidExperiment as exc:
        raise UserError(f"stop: {exc}") from None
    print(f"experiment {ended.name} stopped: every request is served by the default version")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import logging

    from recstack.experiments.report import run
    from recstack.kafka import kafka_security_from_args

    # kafka-python logs every refused connection; an unreachable broker is reported once, below.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    rep = run(
        args.bootstrap,
        experiment=args.experiment,
        redis_client=None if args.no_redis else (lambda: _client(args)),
        impressions_topic=args.impressions_topic,
        events_topic=args.events_topic,
        window_ms=int(args.window * 1000),
        metric=args.metric,
        out_dir=Path(args.out) if args.out else None,
        progress=not args.quiet,
        kafka_options=kafka_security_from_args(args).client_options(),
    )
    print(rep.text())
    return 0


def _common(p: argparse.ArgumentParser, *, models: bool) -> None:
    add_flag(p, "--redis", type=redis_url, default="redis://127.0.0.1:6379/0",
             help="Redis the ranking servers read (their --redis)")  # fmt: skip
    add_redis_auth_flags(p)
    if models:
        add_flag(
            p, "--models", default="artifacts/models", help="the servers' model versions folder (--models)"
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="A/B and shadow experiments between model versions: start, status, report, promote, stop",
        description=(
            "Run an experiment between model versions; docs/EXPERIMENTS.md walks through one. "
            "--redis, its password flags and --models also read RECSTACK_REDIS, "
            "RECSTACK_REDIS_PASSWORD(_FILE) and RECSTACK_MODELS."
        ),
    )
    sub = p.add_subparsers(dest="experiment_command", metavar="ACTION", required=True)

    start = sub.add_parser("start", help="start an experiment: users split between arms by a stable hash")
    start.add_argument("--name", required=True, help="the experiment's name (status, logs; the default salt)")
    start.add_argument(
        "--arm",
        action="append",
        metavar="NAME=VERSION:SHARE",
        help="a live arm: its version and traffic share (0-1 or 50%%); repeat, shares sum to 1",
    )
    start.add_argument(
        "--shadow",
        action="append",
        metavar="NAME=VERSION",
        help="a shadow arm: scores the same batches with spare capacity, never answers",
    )
    start.add_argument("--salt", help="hash salt (default: the name); a new salt reshuffles users")
    start.add_argument(
        "--skip-version-check",
        action="store_true",
        help="skip checking the versions in --models (servers still refuse bad ones)",
    )
    _common(start, models=True)
    start.set_defaults(handler=cmd_start)

    status = sub.add_parser("status", help="the running (or last) experiment")
    status.add_argument("--json", action="store_true", help="the stored state as JSON")
    _common(status, models=False)
    status.set_defaults(handler=cmd_status)

    promote = sub.add_parser(
        "promote", help="make an arm's version the default for everyone and end the experiment"
    )
    promote.add_argument("arm", metavar="ARM", help="the arm whose version becomes the default")
    _common(promote, models=True)
    promote.set_defaults(handler=cmd_promote)

    stop = sub.add_parser("stop", help="end the experiment: every request back to the default version")
    _common(stop, models=False)
    stop.set_defaults(handler=cmd_stop)

    _register_report(sub)


def _register_report(sub: argparse._SubParsersAction) -> None:
    from recstack.flags import duration_s, host_port
    from recstack.kafka import add_kafka_security_flags

    rep = sub.add_parser(
        "report",
        help="per-arm rates with intervals, the test between the arms, a plot and a verdict",
        description=(
            "Read rank-impressions and user-events from the start, credit events to impressions with "
            "the attribution rule, and print per arm: impressions, users, add-to-cart and purchase "
            "rates, MRR and revenue per impression with 99% intervals (users as clusters), the "
            "sequential test between the two live arms and a verdict; the shadow's MRR against the "
            "live lists'; and the attribution consumer's totals from Redis next to them. Writes a "
            "PNG plot over time to --out."
        ),
    )
    add_flag(
        rep, "--experiment", metavar="NAME", help="the experiment (default: the running or last one in Redis)"
    )
    add_flag(rep, "--bootstrap", type=host_port, default="127.0.0.1:9092", metavar="HOST:PORT",
             help="Kafka bootstrap server")  # fmt: skip
    add_flag(rep, "--impressions-topic", default="rank-impressions", help="the servers' impressions topic")
    add_flag(rep, "--events-topic", default="user-events", help="the storefront events topic")
    add_flag(rep, "--window", type=duration_s, default=1800.0, metavar="DURATION",
             help="attribution window in event time, as the consumer's --window (30m)")  # fmt: skip
    add_flag(rep, "--metric", default="purchase", choices=["purchase", "add_to_cart", "mrr", "revenue"],
             help="the metric the verdict is on")  # fmt: skip
    add_flag(rep, "--out", metavar="DIR", help="folder of the plot (default artifacts/experiments/NAME/)")
    add_flag(rep, "--no-redis", type=None, default=False,
             help="read neither the experiment state nor the consumer's totals")  # fmt: skip
    add_flag(rep, "--quiet", type=None, default=False, help="no progress lines while reading the topics")
    _common(rep, models=False)
    add_kafka_security_flags(rep)
    rep.set_defaults(handler=cmd_report)
