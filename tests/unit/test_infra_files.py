"""The files that install, start and ship the stack agree with the contract (docs/CONTRACT.md) and each other.

Static checks only: docker-compose.yml against ports, topics and RECSTACK_* variables; the
lock file against pyproject.toml; the scripts behind `make` and `.ci/run`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

LONG_RUNNING = ("kafka", "redis", "stream", "ranking")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _service(compose: dict, name: str) -> dict:
    assert name in compose["services"], f"docker-compose.yml has no service {name!r}"
    return compose["services"][name]


def _container_ports(service: dict) -> set[int]:
    """Container-side ports of a service's ``ports:`` (short syntax "HOST:CONTAINER" or "CONTAINER")."""
    ports = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _command(service: dict) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def test_compose_has_every_service(compose: dict) -> None:
    assert set(compose["services"]) >= {"kafka", "kafka-init", "redis", "stream", "ranking", "trainer"}
    assert _service(compose, "kafka")["image"].startswith("apache/kafka:")
    assert _service(compose, "redis")["image"].startswith("redis:")


@pytest.mark.parametrize(
    ("name", "ports"),
    [("kafka", {9092}), ("redis", {6379}), ("ranking", {50051, 9464}), ("stream", {9465})],
)
def test_compose_publishes_the_contract_ports(compose: dict, name: str, ports: set[int]) -> None:
    assert ports <= _container_ports(_service(compose, name))


def test_compose_defaults_match_the_local_path(compose: dict) -> None:
    kafka = _environment(_service(compose, "kafka"))
    assert "HOST://127.0.0.1:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    assert kafka["KAFKA_NUM_PARTITIONS"] == "6"
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    ranking = _service(compose, "ranking")
    assert "127.0.0.1:50051:50051" in ranking["ports"]
    assert "127.0.0.1:9464:9464" in ranking["ports"]


def test_stream_consumer_scales(compose: dict) -> None:
    stream = _service(compose, "stream")
    assert "container_name" not in stream
    for entry in stream.get("ports", []):
        host_port = str(entry).split(":")[-2] if ":" in str(entry) else ""
        assert not host_port, f"a fixed host port ({entry}) stops `--scale stream=N`"


# ------------------------------------------------------------------ safe as shipped (issue 14)

REQUIRED = re.compile(r"^\$\{(\w+):\?[^}]+\}$")  # ${VAR:?message}: compose stops when VAR is unset


def test_compose_publishes_every_port_on_loopback_only(compose: dict) -> None:
    published = 0
    for name, service in compose["services"].items():
        for entry in service.get("ports", []):
            published += 1
            if isinstance(entry, dict):
                assert entry.get("host_ip") == "127.0.0.1", f"{name}: {entry}"
            else:
                assert str(entry).startswith("127.0.0.1:"), f"{name} publishes {entry} beyond loopback"
    assert published >= 7


def test_compose_redis_requires_a_password_every_client_has(compose: dict) -> None:
    redis_service = _service(compose, "redis")
    auth = _environment(redis_service)["REDISCLI_AUTH"]
    assert REQUIRED.match(auth) and REQUIRED.match(auth).group(1) == "REDIS_PASSWORD", auth
    command = " ".join(_command(redis_service))
    assert '--requirepass "$$REDISCLI_AUTH"' in command
    assert "PONG" in " ".join(redis_service["healthcheck"]["test"])  # an error reply is not healthy
    clients = [name for name, s in compose["services"].items() if "RECSTACK_REDIS" in _environment(s)]
    assert set(clients) >= {"stream", "ranking"}
    for name in clients:
        env = _environment(_service(compose, name))
        assert env.get("RECSTACK_REDIS_PASSWORD") == auth, f"{name} does not send the Redis password"


def test_compose_grafana_and_prometheus_are_locked(compose: dict) -> None:
    grafana = _environment(_service(compose, "grafana"))
    match = REQUIRED.match(grafana["GF_SECURITY_ADMIN_PASSWORD"])
    assert match and match.group(1) == "GRAFANA_ADMIN_PASSWORD", "Grafana's admin password has a default"
    assert not any("enable-lifecycle" in part for part in _command(_service(compose, "prometheus")))


def test_compose_sets_the_hosts_and_the_ranking_server_starts_with_them(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(compose, "ranking")
    command, ranking = _command(service), _environment(service)
    # Inside the container every interface; the host publishes the ports on loopback only.
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert ranking["RECSTACK_METRICS_HOST"] == "0.0.0.0"
    assert _environment(_service(compose, "stream"))["RECSTACK_METRICS_HOST"] == "0.0.0.0"
    # `recstack serve` with the container's command and environment passes its start-up checks.
    for key, value in ranking.items():
        if key.startswith("RECSTACK_"):
            monkeypatch.setenv(key, "" if value.startswith("${") else value)
    monkeypatch.setenv("RECSTACK_REDIS_PASSWORD", "from-the-environment")
    from recstack.cli import build_parser
    from services.ranking.cli import config_from_args

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    config = config_from_args(action.choices["serve"].parse_args(command[2:]))
    assert config.host == "0.0.0.0" and (config.insecure or config.auth_token or config.tls_cert)


def test_topics_are_created_by_a_one_shot_service(compose: dict) -> None:
    init = _service(compose, "kafka-init")
    script = " ".join(_command(init))
    for topic in ("user-events", "user-events.dlq", "rank-impressions"):
        assert topic in script
    assert "--partitions 6" in script
    assert init.get("restart") == "no"
    assert (
        _service(compose, "stream")["depends_on"]["kafka-init"]["condition"]
        == "service_completed_successfully"
    )


@pytest.mark.parametrize(
    ("name", "subcommand", "variables"),
    [
        ("stream", "stream", {"RECSTACK_BOOTSTRAP", "RECSTACK_REDIS", "RECSTACK_GROUP"}),
        ("ranking", "serve", {"RECSTACK_REDIS", "RECSTACK_MODELS", "RECSTACK_PORT"}),
        ("trainer", "train", {"RECSTACK_OUT"}),
    ],
)
def test_recstack_services_run_their_subcommand(
    compose: dict, name: str, subcommand: str, variables: set[str]
) -> None:
    service = _service(compose, name)
    assert _command(service)[:2] == ["recstack", subcommand]
    env = _environment(service)
    assert variables <= set(env)
    if "RECSTACK_BOOTSTRAP" in env:
        assert env["RECSTACK_BOOTSTRAP"] == "kafka:19092"
    if "RECSTACK_REDIS" in env:
        assert env["RECSTACK_REDIS"] == "redis://redis:6379/0"
    if "RECSTACK_PORT" in env:
        assert env["RECSTACK_PORT"] == "50051"


def test_trainer_is_a_one_shot_profile(compose: dict) -> None:
    trainer = _service(compose, "trainer")
    assert trainer["profiles"] == ["train"]
    assert trainer.get("restart") == "no"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_healthchecks(compose: dict, name: str) -> None:
    healthcheck = _service(compose, name)["healthcheck"]
    assert healthcheck["test"]
    assert "interval" in healthcheck


def test_ranking_healthcheck_uses_grpc_health(compose: dict) -> None:
    test = _service(compose, "ranking")["healthcheck"]["test"]
    code = test[-1]
    assert "grpc_health" in code and "recstack.v1.RankingService" in code
    compile(code, "ranking-healthcheck", "exec")


def _subcommand_flags() -> dict[str, set[str]]:
    """``{subcommand: {RECSTACK_* variable of each flag}}`` from the installed ``recstack`` parser."""
    from recstack.cli import build_parser
    from recstack.flags import env_name

    parser = build_parser()
    flags: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                flags[name] = {
                    env_name(opt) for a in sub._actions for opt in a.option_strings if opt.startswith("--")
                }
    return flags


@pytest.mark.parametrize("name", ["stream", "ranking", "trainer"])
def test_compose_variables_are_real_flags(compose: dict, name: str) -> None:
    service = _service(compose, name)
    subcommand = _command(service)[1]
    flags = _subcommand_flags()
    if subcommand not in flags:
        pytest.skip(f"`recstack {subcommand}` is not in this checkout yet")
    from services.ranking.config import AUTH_TOKEN_ENV  # read by the code, not a flag (never on argv)

    known = flags[subcommand] | ({AUTH_TOKEN_ENV} if subcommand == "serve" else set())
    unknown = {var for var in _environment(service) if var.startswith("RECSTACK_")} - known
    assert not unknown, f"{name}: {sorted(unknown)} are not flags of `recstack {subcommand}`"


def test_dockerfile_installs_the_project_with_the_lock_file() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert "-c constraints.txt" in text
    assert "ranking.proto" in text  # stubs are generated in the image, not copied from git


def _requirement_pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==([^;\s]+)", requirement.strip())
        assert match, f"pyproject.toml: {requirement!r} is not pinned with =="
        pins[_normalize(match.group(1))] = match.group(3)
    return pins


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_file_pins_every_package_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _requirement_pins(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        wanted.update(_requirement_pins(extra))
    locked: dict[str, str] = {}
    for raw in (ROOT / "constraints.txt").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: {line!r} is not name==version"
        locked[_normalize(name)] = version
    assert "recstack" not in locked
    mismatched = {name: (pin, locked.get(name)) for name, pin in wanted.items() if locked.get(name) != pin}
    assert not mismatched, f"pyproject pin vs constraints.txt (run `make lock`): {mismatched}"


def test_ci_runs_make_test() -> None:
    script = ROOT / ".ci" / "run"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    commands = [
        line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands[-1] == "make test"
    assert os.access(script, os.X_OK)


def test_makefile_has_the_documented_targets() -> None:
    text = (ROOT / "Makefile").read_text()
    for target in ("help", "install", "proto", "up", "down", "test", "demo", "lint", "clean"):
        assert re.search(rf"^{target}:", text, re.MULTILINE), f"Makefile has no target {target}"
    assert re.search(r"^\.DEFAULT_GOAL := help$", text, re.MULTILINE)


def test_make_test_installs_the_tools_its_tests_need() -> None:
    # openssl (TLS test), promtool (alert rules), kustomize (manifests): those tests fail, never skip.
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: .*\btools\b", text, re.MULTILINE), "make test does not depend on tools"
    assert re.search(r"^tools:.*\n\t@infra/tools\.sh$", text, re.MULTILINE)
    script = (ROOT / "infra" / "tools.sh").read_text()
    for needed in ("openssl", "prometheus", 'render.sh" --kustomize'):
        assert needed in script


@pytest.mark.parametrize(
    "script", ["up.sh", "down.sh", "kafka.sh", "redis.sh", "with-services.sh", "tools.sh"]
)
def test_infra_scripts_are_valid_bash(script: str) -> None:
    path = ROOT / "infra" / script
    assert os.access(path, os.X_OK), f"{path} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_generated_and_local_state_is_ignored_by_git() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    for entry in ("/.venv/", "/.run/", "/recstack/v1/*_pb2*.py", "/recstack/v1/*_pb2*.pyi"):
        assert entry in ignored
