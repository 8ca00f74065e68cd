"""The ``recstack`` console command: one subcommand per job of the stack.

Each part of the stack registers its own subcommands, so this file only wires them up.
Imports of heavy libraries (torch, feast, grpc) happen inside each subcommand's handler,
which keeps ``recstack --help`` fast and lets ``recstack loadtest`` import locust first.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from recstack.errors import UserError

# module path -> it exposes register(subparsers) adding one or more subcommands
_SUBCOMMAND_MODULES = (
    "services.stream.cli",
    "services.attribution.cli",
    "services.replay.cli",
    "models.cli",
    "services.ranking.cli",
    "loadtests.cli",
    "loadtests.chaos.cli",
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
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part of the stack is not installed in this checkout
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"recstack {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
