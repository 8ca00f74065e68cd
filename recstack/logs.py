"""Log set-up shared by every recstack command: ``--log-level`` and ``--log-format text|json``.

``text`` is the line people read (``time LEVEL logger: message``, a traceback on the lines
after it). ``json`` is for log shippers: one JSON object per line with the same fields, named
``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, ``exception`` (the formatted
traceback, when there is one), ``stack`` (with ``stack_info``) and every ``extra={...}`` field
of the call. Newlines inside a message or traceback are escaped, so a record is never split
across lines.

The JSON encoding is python-json-logger's: it already turns a ``LogRecord`` with its extras into
a dict and serializes odd values (datetimes, exceptions, dataclasses) instead of failing.
Secrets: messages are redacted where they are written (:func:`recstack.redis_url.redact` for
every Redis URL; tokens and passwords are never put in a message), and the JSON path logs the
same message text. As a second guard for structured fields, which the text format never
shows, an ``extra`` whose name says it is a secret is replaced by ``***`` and an ``extra``
holding a URL is redacted like any logged URL.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from types import TracebackType
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

from recstack.redis_url import redact

LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV = "RECSTACK_LOG_FORMAT"
LOG_LEVEL_ENV = "RECSTACK_LOG_LEVEL"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Field names of an `extra` that must never be logged as they are (compared lower-cased).
_SECRET_WORDS = ("password", "token", "secret", "authorization", "credential", "api_key")


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


class JsonLogFormatter(JsonFormatter):
    """One JSON object per record, with the text format's fields under stable names."""

    def __init__(self) -> None:
        super().__init__(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={
                "levelname": "level",
                "name": "logger",
                "exc_info": "exception",
                "stack_info": "stack",
            },
            timestamp="time",
            json_ensure_ascii=False,
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"time": log_data.pop("time")}
        for key, value in log_data.items():
            if key in ("level", "logger", "message", "exception", "stack"):
                out[key] = value
            elif _is_secret_name(key):
                out[key] = "***"
            elif isinstance(value, str) and "://" in value:
                out[key] = redact(value)
            else:
                out[key] = value
        return out


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonLogFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format: expected one of {', '.join(LOG_FORMATS)}, got {log_format!r}")


def configure(level: str | int = "INFO", log_format: str = "text", stream: IO[str] | None = None) -> None:
    """Send the root logger's records to ``stream`` (stderr) in ``log_format``.

    Like :func:`logging.basicConfig`, it leaves a root logger that already has handlers alone
    (pytest's, or an embedding program's)."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(make_formatter(log_format))
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, handlers=[handler])
    if log_format == "json":
        # Everything else a process writes to stderr becomes a record too, so a shipper never
        # meets a line that is not JSON: warnings, and exceptions nothing caught.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("recstack").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("recstack").error(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )


def default_log_format() -> str:
    """``$RECSTACK_LOG_FORMAT`` when it names a format, else text."""
    value = os.environ.get(LOG_FORMAT_ENV, "text").strip().lower() or "text"
    if value not in LOG_FORMATS:
        raise ValueError(f"{LOG_FORMAT_ENV}: expected one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value


def add_log_flags(parser: argparse.ArgumentParser, *, top_level: bool, level_default: str = "INFO") -> None:
    """``--log-level`` and ``--log-format``. On the top-level parser they carry the defaults
    (from ``RECSTACK_LOG_LEVEL``/``RECSTACK_LOG_FORMAT``); on a subcommand they default to
    "not given", so ``recstack serve --log-format json`` and ``recstack --log-format json serve``
    mean the same and a subcommand's value is not overwritten by the top level's default."""
    try:
        format_default = default_log_format()
    except ValueError as exc:
        parser.error(str(exc))
    parser.add_argument(
        "--log-level",
        default=os.environ.get(LOG_LEVEL_ENV, level_default) if top_level else argparse.SUPPRESS,
        help=f"logging level: DEBUG, INFO, WARNING, ERROR (default: {level_default}) [env {LOG_LEVEL_ENV}]",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=format_default if top_level else argparse.SUPPRESS,
        help="text: one readable line per record; json: one JSON object per line (time, level, "
        f"logger, message, exception, extra fields) for log shippers (default: text) [env {LOG_FORMAT_ENV}]",
    )
