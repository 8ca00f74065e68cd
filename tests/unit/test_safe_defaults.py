"""What a user runs as shipped is safe: the servers stay on loopback unless given a host, a ranking
server beyond loopback needs a token or TLS (or an explicit --insecure), and the number of calls
it holds at once is bounded."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from recstack.cli import build_parser, main
from recstack.errors import UserError


def _parse(command: str, *argv: str) -> argparse.Namespace:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command].parse_args(list(argv))


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOST", "METRICS_HOST", "INSECURE", "AUTH_TOKEN", "MAX_CONCURRENT_RPCS"):
        monkeypatch.delenv(f"RECSTACK_{name}", raising=False)


def test_servers_and_metrics_listen_on_loopback_by_default() -> None:
    from services.ranking.cli import config_from_args
    from services.ranking.config import RankingConfig
    from services.stream.config import StreamConfig

    assert RankingConfig().host == "127.0.0.1"
    assert RankingConfig().metrics_host == "127.0.0.1"
    assert StreamConfig().metrics_host == "127.0.0.1"
    config = config_from_args(_parse("serve"))
    assert (config.host, config.metrics_host) == ("127.0.0.1", "127.0.0.1")
    assert _parse("stream").metrics_host == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "ranking.example"])
def test_serve_beyond_loopback_without_token_or_tls_is_refused(host: str) -> None:
    from services.ranking.cli import config_from_args

    with pytest.raises(UserError) as refused:
        config_from_args(_parse("serve", "--host", host))
    message = str(refused.value)
    for named in (host, "--auth-token-file", "RECSTACK_AUTH_TOKEN", "--tls-cert", "--tls-key", "--insecure"):
        assert named in message


def test_the_refusal_reaches_the_user_as_a_clear_cli_error(capsys: pytest.CaptureFixture) -> None:
    argv = ["serve", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "0", "--models", "/nonexistent"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("recstack serve: ") and "--insecure" in err and "Traceback" not in err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_token(host: str) -> None:
    from services.ranking.cli import config_from_args

    assert config_from_args(_parse("serve", "--host", host)).host == host


def test_beyond_loopback_with_a_token_tls_or_insecure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.ranking.cli import config_from_args

    token = tmp_path / "token"
    token.write_text("a-token\n")
    assert config_from_args(_parse("serve", "--host", "0.0.0.0", "--auth-token-file", str(token))).auth_token
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not checked here")
    key.write_text("not checked here")
    args = _parse("serve", "--host", "0.0.0.0", "--tls-cert", str(cert), "--tls-key", str(key))
    assert config_from_args(args).tls_cert == cert
    assert config_from_args(_parse("serve", "--host", "0.0.0.0", "--insecure")).insecure
    monkeypatch.setenv("RECSTACK_INSECURE", "true")  # the variable compose and Kubernetes would set
    assert config_from_args(_parse("serve", "--host", "0.0.0.0")).insecure


def test_concurrent_calls_are_bounded_by_default() -> None:
    from services.ranking.cli import config_from_args
    from services.ranking.config import RankingConfig

    assert RankingConfig().max_concurrent_rpcs == 1_000
    assert config_from_args(_parse("serve", "--max-concurrent-rpcs", "50")).max_concurrent_rpcs == 50
    with pytest.raises(SystemExit):
        _parse("serve", "--max-concurrent-rpcs", "0")
    with pytest.raises(ValueError, match="max_concurrent_rpcs"):
        RankingConfig(max_concurrent_rpcs=0)
