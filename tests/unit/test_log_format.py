"""--log-format json: one JSON object per record, the text format's fields, secrets kept out."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest

from recstack.cli import build_parser
from recstack.logs import JsonLogFormatter, make_formatter

SECRET = "s3cr3t-pw"


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger writing through the JSON formatter into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("recstack.test_log_format")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def _records(stream: io.StringIO) -> list[dict]:
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_a_record_has_the_text_formats_fields(logged) -> None:
    logger, stream = logged
    logger.warning("partition %d lagging by %s", 3, "2 s", extra={"partition": 3, "topic": "events"})
    (record,) = _records(stream)
    assert record["level"] == "WARNING"
    assert record["logger"] == "recstack.test_log_format"
    assert record["message"] == "partition 3 lagging by 2 s"
    assert record["partition"] == 3 and record["topic"] == "events"
    assert datetime.fromisoformat(record["time"]).utcoffset().total_seconds() == 0
    assert list(record)[:4] == ["time", "level", "logger", "message"]
    assert "exception" not in record


def test_an_exception_stays_on_one_line_with_its_traceback(logged) -> None:
    logger, stream = logged
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("batch of %d failed\nsecond line of the message", 4)
    logger.info("after")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines  # a multi-line message and traceback are still one line
    first = json.loads(lines[0])
    assert first["level"] == "ERROR"
    assert first["message"] == "batch of 4 failed\nsecond line of the message"
    assert first["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: bad\nthing" in first["exception"]
    assert json.loads(lines[1])["message"] == "after"


def test_odd_extra_values_are_serialized_not_fatal(logged) -> None:
    logger, stream = logged
    logger.info("odd", extra={"when": datetime(2026, 1, 2, 3, 4, 5), "obj": object(), "ids": ("a", "b")})
    (record,) = _records(stream)
    assert record["when"].startswith("2026-01-02T03:04:05")
    assert "object" in record["obj"]
    assert record["ids"] == ["a", "b"]


def test_secrets_stay_out_of_json_lines(logged) -> None:
    from recstack.credentials import redact_url

    logger, stream = logged
    url = f"redis://app:{SECRET}@127.0.0.1:6379/0"
    # The message is redacted where it is written, as for the text format ...
    logger.info("connecting to %s", redact_url(url))
    # ... and structured fields get a second guard: URLs redacted, secret-named fields hidden.
    logger.info("settings", extra={"redis": url, "auth_token": SECRET, "redis_password": SECRET})
    text = stream.getvalue()
    assert SECRET not in text
    first, second = _records(stream)
    assert first["message"] == "connecting to redis://app:***@127.0.0.1:6379/0"
    assert second["redis"] == "redis://app:***@127.0.0.1:6379/0"
    assert second["auth_token"] == "***" and second["redis_password"] == "***"


def test_text_format_is_unchanged() -> None:
    record = logging.LogRecord("recstack.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    line = make_formatter("text").format(record)
    assert line.endswith(" INFO recstack.x: hello you")


def test_every_subcommand_takes_log_format_and_the_environment_sets_its_default(monkeypatch) -> None:
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"serve", "stream", "replay", "chaos"} <= set(subcommands)
    for name, subparser in subcommands.items():
        assert "--log-format" in subparser._option_string_actions, name
    # either position, and the top level's default does not overwrite the subcommand's value
    assert build_parser().parse_args(["--log-format", "json", "serve"]).log_format == "json"
    assert build_parser().parse_args(["serve"]).log_format == "text"
    monkeypatch.setenv("RECSTACK_LOG_FORMAT", "json")
    assert build_parser().parse_args(["serve"]).log_format == "json"
    assert build_parser().parse_args(["serve", "--log-format", "text"]).log_format == "text"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-format", "xml"])
