"""The ``recstack`` console command: one subcommand per job of the stack.

Each part of the stack registers its own subcommands, so this file only wires them up.
Imports of heavy libraries (torch, feast, grpc) happen inside each subcommand's handler,
which keeps ``recstack --help`` fast and lets ``recstack loadtest`` import locust first.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from recstack.errors import UserError
from recstack.logs import LOG_FORMAT_ENV, add_log_flags, configure

# module path -> it exposes register(subparsers) adding one or more subcommands
_SUBCOMMAND_MODULES = (
    "services.stream.cli",
    "services.attribution.cli",
    "services.replay.cli",
    "models.cli",
    "services.ranking.cli",
    "loadtests.cli",
    "loadtests.chaos.cli",
    "recstack.experiments.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recstack",
        description=(
            "Real-time recommendation stack: publish storefront events to Kafka, turn them into "
            "Feast/Redis features, train a PyTorch ranker and serve it over gRPC."
        ),
        epilog="Every flag can also be set with an environment variable RECSTACK_<FLAG>.",
    )
    add_log_flags(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part of the stack is not installed in this checkout
            raise
        module.register(subparsers)
    for subparser in subparsers.choices.values():
        add_log_flags(subparser, top_level=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        configure(args.log_level, args.log_format)
    except ValueError as exc:  # an unknown --log-level
        parser.error(f"--log-level: {exc}")
    # Processes this command starts (serve --workers, the chaos stack, load-test servers) log
    # in the same format: they read the variable as their default. (Their level stays their own.)
    os.environ[LOG_FORMAT_ENV] = args.log_format
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        if args.log_format == "json":
            logging.getLogger("recstack").error("recstack %s: %s", args.command, exc)
        else:
            print(f"recstack {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
