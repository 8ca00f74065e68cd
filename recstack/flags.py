"""Command-line flags that also read ``RECSTACK_*`` environment variables.

Precedence, stated once for every subcommand: a flag given on the command line wins over
the environment variable, which wins over the default written here.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from recstack.errors import UserError

ENV_PREFIX = "RECSTACK_"


def env_name(flag: str) -> str:
    """``--max-queue-delay-ms`` -> ``RECSTACK_MAX_QUEUE_DELAY_MS``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    help: str,
    default: Any = None,
    type: Callable[[str], Any] | None = str,
    nargs: str | None = None,
    choices: list[str] | None = None,
    metavar: str | None = None,
    required: bool = False,
    secret: bool = False,
) -> None:
    """Add ``flag`` whose default comes from ``RECSTACK_<FLAG>`` when that variable is set.

    Boolean switches are declared with ``type=None`` and ``default=False``: ``--flag`` turns
    them on, and ``RECSTACK_FLAG=true`` does the same from the environment. A ``secret`` flag
    (a password) never shows its value, in ``--help`` or in an error.
    """
    variable = env_name(flag)
    raw = os.environ.get(variable)
    if type is None:  # a switch
        value = default
        if raw is not None:
            try:
                value = _parse_bool(raw)
            except ValueError as exc:
                parser.error(f"environment variable {variable}: {exc}")
        parser.add_argument(flag, action="store_true", default=value, help=f"{help} [env {variable}]")
        return
    if raw is not None:
        try:
            value = [type(part) for part in raw.split()] if nargs in ("+", "*") else type(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            shown_raw = "<hidden>" if secret else repr(raw)
            parser.error(f"environment variable {variable}={shown_raw} is not valid: {exc}")
        default, required = value, False
    if default is None:
        shown = ""
    else:
        shown = " (set from the environment)" if secret else f" (default: {default})"
    parser.add_argument(
        flag,
        default=default,
        type=type,
        nargs=nargs,
        choices=choices,
        metavar=metavar,
        required=required,
        help=f"{help}{shown} [env {variable}]",
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def redis_url(text: str) -> str:
    from recstack import redis_url as urls

    try:
        return urls.check(text, flag="URL")
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("URL: ")) from exc


_DURATION_UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))  # "ms" before "s" and "m"


def duration_s(text: str) -> float:
    """A positive duration in seconds: ``300``, ``300s``, ``5m``, ``1h``, ``500ms``."""
    number, factor = text.strip().lower(), 1.0
    for unit, seconds in _DURATION_UNITS:
        if number.endswith(unit):
            number, factor = number[: -len(unit)], seconds
            break
    try:
        value = float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 300, 90s, 5m or 1h, got {text!r}"
        ) from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive duration, got {text!r}")
    return value
