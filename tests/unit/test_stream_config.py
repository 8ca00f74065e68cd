"""``recstack stream`` / ``recstack replay`` flags and the stream consumer's configuration."""

from __future__ import annotations

import pytest

from recstack.cli import build_parser, main
from recstack.errors import UserError
from services.stream.config import StreamConfig


def test_defaults_follow_the_contract():
    args = build_parser().parse_args(["stream"])
    config = StreamConfig.from_namespace(args)
    assert config.bootstrap == "127.0.0.1:9092"
    assert config.redis == "redis://127.0.0.1:6379/0"
    assert config.group == "recstack-stream"
    assert (config.topic, config.dlq_topic) == ("user-events", "user-events.dlq")
    assert config.metrics_port == 9465
    assert config.dedup_window_s == 86_400
    assert config.event_log == "artifacts/events"


def test_environment_then_flags_override_defaults(monkeypatch):
    monkeypatch.setenv("RECSTACK_GROUP", "from-env")
    monkeypatch.setenv("RECSTACK_MAX_BATCH", "123")
    monkeypatch.setenv("RECSTACK_EVENT_LOG", "")
    args = build_parser().parse_args(["stream", "--max-batch", "456"])
    config = StreamConfig.from_namespace(args)
    assert (config.group, config.max_batch, config.event_log) == ("from-env", 456, "")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"dlq_topic": "user-events"}, "--dlq-topic"),
        ({"topic": ""}, "--topic"),
        ({"dedup_window_s": 0}, "--dedup-window-s"),
        ({"trending_half_life_s": 0.0}, "--trending-half-life-s"),
        ({"metrics_port": 70_000}, "--metrics-port"),
        ({"max_batch": 0}, "--max-batch"),
        ({"redis": "http://x"}, "--redis"),
        ({"bootstrap": "nohostport"}, "--bootstrap"),
        ({"session_timeout_ms": 10}, "--session-timeout-ms"),
    ],
)
def test_invalid_configuration_is_refused_naming_the_flag(changes, needle):
    with pytest.raises(UserError, match=needle):
        StreamConfig(**changes)


def test_bad_flag_values_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stream", "--max-batch", "0"])
    assert "--max-batch" in capsys.readouterr().err


def test_every_stream_flag_has_help_and_an_environment_variable(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stream", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--bootstrap",
        "--redis",
        "--group",
        "--topic",
        "--dlq-topic",
        "--event-log",
        "--dedup-window-s",
        "--trending-half-life-s",
        "--metrics-port",
        "--max-batch",
    ):
        assert flag in out
        assert "RECSTACK_" + flag.lstrip("-").replace("-", "_").upper() in out


def test_replay_refuses_a_missing_path_naming_it(capsys):
    assert main(["replay", "--source", "/no/such/events.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "/no/such/events.jsonl" in err and "no such file" in err


def test_eventlog_max_unwritten_from_env_and_checked_against_the_roll_size(monkeypatch):
    monkeypatch.setenv("RECSTACK_EVENTLOG_MAX_UNWRITTEN", "300000")
    config = StreamConfig.from_namespace(build_parser().parse_args(["stream"]))
    assert config.eventlog_max_unwritten == 300_000
    assert StreamConfig().eventlog_max_unwritten >= StreamConfig().log_roll_rows
    with pytest.raises(UserError, match="--eventlog-max-unwritten"):
        StreamConfig(eventlog_max_unwritten=1_000, log_roll_rows=5_000)
