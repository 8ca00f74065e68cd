"""Security settings: Kafka TLS/SASL flags on every Kafka client, Redis credentials, secrets kept
out of ``--help``, errors and log lines."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from urllib.parse import quote

import pytest

from recstack.cli import build_parser
from recstack.credentials import redact_url, resolve_redis_url
from recstack.errors import UserError
from recstack.kafka import (
    SASL_MECHANISMS,
    KafkaSecurity,
    kafka_security_from_args,
    kafka_security_from_env,
)

SECRET = "hunter2-" + "x" * 8
KAFKA_COMMANDS = ("stream", "replay", "loadtest")
KAFKA_FLAGS = (
    "--kafka-security-protocol",
    "--kafka-sasl-mechanism",
    "--kafka-sasl-username",
    "--kafka-sasl-password",
    "--kafka-sasl-password-file",
    "--kafka-ssl-cafile",
    "--kafka-ssl-certfile",
    "--kafka-ssl-keyfile",
)


def _sub(name: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _parse(command: str, *argv: str) -> argparse.Namespace:
    return _sub(command).parse_args(list(argv))


# ------------------------------------------------------------------------------------- Kafka
@pytest.mark.parametrize("command", KAFKA_COMMANDS)
def test_every_kafka_client_command_has_the_security_flags(command):
    options = {o for a in _sub(command)._actions for o in a.option_strings}
    assert set(KAFKA_FLAGS) <= options


def test_default_is_plaintext_with_nothing_else():
    security = kafka_security_from_args(_parse("stream"))
    assert security == KafkaSecurity()
    assert security.client_options() == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("mechanism", SASL_MECHANISMS)
def test_sasl_settings_map_onto_kafka_python(mechanism, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    args = _parse(
        "replay",
        "--kafka-security-protocol", "SASL_SSL",
        "--kafka-sasl-mechanism", mechanism,
        "--kafka-sasl-username", "recstack-stream",
        "--kafka-sasl-password", SECRET,
        "--kafka-ssl-cafile", str(ca),
    )  # fmt: skip
    options = kafka_security_from_args(args).client_options()
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "recstack-stream",
        "sasl_plain_password": SECRET,
        "ssl_cafile": str(ca),
        "ssl_certfile": None,
        "ssl_keyfile": None,
    }
    # kafka-python accepts every one of them (an unknown keyword would raise here).
    from kafka import KafkaProducer

    assert set(options) <= set(KafkaProducer.DEFAULT_CONFIG)


def test_environment_variables_set_the_flags(monkeypatch):
    monkeypatch.setenv("RECSTACK_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("RECSTACK_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("RECSTACK_KAFKA_SASL_USERNAME", "recstack-stream")
    monkeypatch.setenv("RECSTACK_KAFKA_SASL_PASSWORD", SECRET)
    security = kafka_security_from_args(_parse("stream"))
    assert security.describe() == "SASL_PLAINTEXT SCRAM-SHA-512 as recstack-stream"
    assert security.sasl_password == SECRET
    # ...and the Locust worker, which has no command line of ours, reads the same variables.
    assert kafka_security_from_env() == security


def test_settings_travel_to_a_child_process_in_its_environment(monkeypatch):
    security = KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "shop", SECRET)
    for name, value in security.environment().items():
        monkeypatch.setenv(name, value)
    assert kafka_security_from_env() == security


def test_password_file(tmp_path):
    secret = tmp_path / "kafka-password"
    secret.write_text(SECRET + "\n")
    args = _parse(
        "stream",
        "--kafka-security-protocol", "SASL_PLAINTEXT",
        "--kafka-sasl-mechanism", "PLAIN",
        "--kafka-sasl-username", "u",
        "--kafka-sasl-password-file", str(secret),
    )  # fmt: skip
    assert kafka_security_from_args(args).sasl_password == SECRET


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-username", "u",
          "--kafka-sasl-password", SECRET], "--kafka-sasl-mechanism"),
        (["--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-mechanism", "PLAIN",
          "--kafka-sasl-password", SECRET], "--kafka-sasl-username"),
        (["--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-mechanism", "PLAIN",
          "--kafka-sasl-username", "u"], "--kafka-sasl-password"),
        (["--kafka-sasl-username", "u", "--kafka-sasl-password", SECRET], "--kafka-sasl-username"),
        (["--kafka-ssl-cafile", "/etc/hostname"], "--kafka-ssl-cafile"),
        (["--kafka-security-protocol", "SSL", "--kafka-ssl-cafile", "/no/such/ca.pem"], "--kafka-ssl-cafile"),
        (["--kafka-security-protocol", "SSL", "--kafka-ssl-certfile", "/etc/hostname"],
         "--kafka-ssl-keyfile"),
        (["--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-mechanism", "PLAIN",
          "--kafka-sasl-username", "u", "--kafka-sasl-password", SECRET,
          "--kafka-sasl-password-file", "/etc/hostname"], "once"),
        (["--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-mechanism", "PLAIN",
          "--kafka-sasl-username", "u", "--kafka-sasl-password-file", "/no/such/file"],
         "--kafka-sasl-password-file"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_flag_and_hide_the_password(argv, named):
    with pytest.raises(UserError) as caught:
        kafka_security_from_args(_parse("stream", *argv))
    assert named in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_bad_protocol_from_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("RECSTACK_KAFKA_SECURITY_PROTOCOL", "SASL")
    with pytest.raises(UserError, match="--kafka-security-protocol"):
        kafka_security_from_args(_parse("stream"))


def test_the_password_is_not_in_repr():
    security = KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "u", SECRET)
    assert SECRET not in repr(security) and SECRET not in security.describe()


# ------------------------------------------------------------------------------------- Redis
def test_redis_password_goes_into_the_url_quoted():
    password = "p@ss:w/rd,1=2%"
    url = resolve_redis_url("redis://127.0.0.1:6379/3", password, None)
    assert url == f"redis://:{quote(password, safe='')}@127.0.0.1:6379/3"
    from urllib.parse import unquote, urlsplit

    assert unquote(urlsplit(url).password) == password
    assert resolve_redis_url("redis://acl-user@h:1/0", "pw", None) == "redis://acl-user:pw@h:1/0"
    assert resolve_redis_url("redis://h:1/0", None, None) == "redis://h:1/0"


def test_redis_password_file(tmp_path):
    secret = tmp_path / "redis-password"
    secret.write_text(SECRET + "\n")
    assert resolve_redis_url("redis://h:1/0", None, str(secret)) == f"redis://:{SECRET}@h:1/0"


@pytest.mark.parametrize(
    ("url", "password", "file", "named"),
    [
        ("redis://:inurl@h:1/0", SECRET, None, "already holds a password"),
        ("redis://h:1/0", SECRET, "/etc/hostname", "once"),
        ("redis://h:1/0", None, "/no/such/file", "--redis-password-file"),
        ("redis://h:1/0", "", None, "RECSTACK_REDIS_PASSWORD"),
    ],
)
def test_redis_password_given_wrongly(url, password, file, named):
    with pytest.raises(UserError) as caught:
        resolve_redis_url(url, password, file)
    assert named in str(caught.value)
    assert SECRET not in str(caught.value) and "inurl" not in str(caught.value)


def test_the_start_up_check_leaves_other_url_schemes_to_their_clients():
    from recstack.credentials import check_redis_auth

    check_redis_auth("redis+cluster://:pw@127.0.0.1:1,127.0.0.1:2")  # no error, no connection


def test_redact_url():
    assert redact_url("redis://user:secret@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://:secret@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url("redis+cluster://:secret@h1:1,h2:2") == "redis+cluster://:***@h1:1,h2:2"
    assert resolve_redis_url("redis+cluster://h1:1,h2:2", "p,w", None) == "redis+cluster://:p%2Cw@h1:1,h2:2"


@pytest.mark.parametrize("password", ["plain", "12345", "true", "null", "1e5", "a,b=c", 'q"u\\ote', "ü"])
def test_feast_reads_back_exactly_the_password(password):
    """Feast splits its connection string at commas and JSON-decodes each value."""
    from feast.infra.online_stores.redis import RedisOnlineStore

    from feature_store.store import connection_string

    url = f"redis://user:{quote(password, safe='')}@10.0.0.1:6380/4"
    nodes, params = RedisOnlineStore._parse_connection_string(connection_string(url))
    assert nodes == [{"host": "10.0.0.1", "port": "6380"}]
    assert params == {"db": 4, "username": "user", "password": password}


def test_ranking_config_repr_hides_the_redis_url():
    from services.ranking.config import RankingConfig

    config = RankingConfig(redis_url=f"redis://:{SECRET}@h:1/0", auth_token=SECRET)
    assert SECRET not in repr(config)


# ------------------------------------------------------------------- secrets in --help output
def test_help_never_shows_a_secret_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("RECSTACK_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("RECSTACK_REDIS_PASSWORD", SECRET)
    monkeypatch.setenv("RECSTACK_AUTH_TOKEN", SECRET)
    for command in ("stream", "serve", "replay", "loadtest"):
        with pytest.raises(SystemExit) as done:
            _sub(command).parse_args(["--help"])  # flags read the environment when built
        assert done.value.code == 0
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert SECRET not in out, command
        if command in KAFKA_COMMANDS:
            assert "--kafka-sasl-password" in out and "RECSTACK_KAFKA_SASL_PASSWORD" in out
            assert "(set from the environment)" in out
        if command in ("stream", "serve"):
            assert "RECSTACK_REDIS_PASSWORD" in out


def test_help_runs_as_a_process_without_showing_the_secret():
    env = {**os.environ, "RECSTACK_KAFKA_SASL_PASSWORD": SECRET, "RECSTACK_REDIS_PASSWORD": SECRET}
    out = subprocess.run(
        [sys.executable, "-m", "recstack.cli", "stream", "--help"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "RECSTACK_KAFKA_SASL_PASSWORD" in out.stdout and SECRET not in out.stdout + out.stderr


# ------------------------------------------------------------ the stream consumer's Kafka clients
class _FakeClient:
    made: list[dict] = []
    failures = 0

    def __init__(self, **options) -> None:
        if _FakeClient.failures:
            _FakeClient.failures -= 1
            from kafka.errors import KafkaTimeoutError

            raise KafkaTimeoutError("Unable to bootstrap from 127.0.0.1:1")
        _FakeClient.made.append(options)


def test_stream_consumer_and_dlq_producer_get_the_security_options(monkeypatch, caplog):
    import services.stream.consumer as consumer_module
    import services.stream.deadletter as deadletter_module
    import services.stream.kafka_side as kafka_side_module
    from services.stream.config import StreamConfig

    monkeypatch.setattr(kafka_side_module, "KafkaConsumer", _FakeClient)
    monkeypatch.setattr(deadletter_module, "KafkaProducer", _FakeClient)
    _FakeClient.made, _FakeClient.failures = [], 1
    security = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", "recstack-stream", SECRET)
    config = StreamConfig(bootstrap="127.0.0.1:1", event_log="", metrics_port=0, kafka_security=security)
    consumer = consumer_module.StreamConsumer(config)
    with caplog.at_level("WARNING", logger=consumer_module.__name__):
        consumer._connect()  # fails once (as a broker refusing the password looks), then connects
    assert len(_FakeClient.made) == 2  # the consumer and its dead-letter producer
    for options in _FakeClient.made:
        assert options["security_protocol"] == "SASL_PLAINTEXT"
        assert options["sasl_mechanism"] == "SCRAM-SHA-512"
        assert options["sasl_plain_username"] == "recstack-stream"
        assert options["sasl_plain_password"] == SECRET
    assert "check --kafka-sasl-username" in caplog.text and "RECSTACK_KAFKA_SASL_PASSWORD" in caplog.text
    assert SECRET not in caplog.text
