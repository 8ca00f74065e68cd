"""``recstack loadtest``, ``bench`` and ``slo-gate``: flags, environment variables, the Locust run."""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import workload
from loadtests.cli import duration, register
from loadtests.locust_runner import (
    LocustRun,
    locust_command,
    read_final_stats,
    read_path_counts,
    render_summary,
)
from recstack.cli import build_parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recstack")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_subcommands_are_registered_with_the_main_command() -> None:
    text = build_parser().format_help()
    for name in ("loadtest", "bench", "slo-gate"):
        assert name in text


@pytest.mark.parametrize(
    ("text", "seconds"), [("60", 60.0), ("60s", 60.0), ("1.5m", 90.0), ("500ms", 0.5), ("1h", 3600.0)]
)
def test_duration(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1s", "ten", "5d"])
def test_bad_duration(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def test_flags_read_recstack_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSTACK_P99_MS", "25")
    monkeypatch.setenv("RECSTACK_RATE", "300")
    monkeypatch.setenv("RECSTACK_QUICK", "true")
    monkeypatch.setenv("RECSTACK_USERS", "7")
    parser = _parser()
    gate = parser.parse_args(["slo-gate", "--target", "10.0.0.1:1234"])
    assert gate.p99_ms == 25.0 and gate.rate == 300.0 and gate.target == "10.0.0.1:1234"
    assert parser.parse_args(["slo-gate", "--rate", "50"]).rate == 50.0  # the flag wins
    bench = parser.parse_args(["bench"])
    assert bench.quick is True and bench.servers == ["echo", "naive", "real"]
    assert parser.parse_args(["loadtest"]).users == 7


def test_slo_gate_needs_a_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECSTACK_RATE", raising=False)
    with pytest.raises(SystemExit):
        _parser().parse_args(["slo-gate"])


def test_every_flag_names_its_environment_variable() -> None:
    parser = _parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert "[env RECSTACK_" in (action.help or ""), f"{name} {action.option_strings}"


def test_locust_command_is_headless_with_csv_and_html(tmp_path: Path) -> None:
    run = LocustRun(host="127.0.0.1:50051", users=10, spawn_rate=2, duration_s=60, out=tmp_path,
                    bootstrap="127.0.0.1:9092")  # fmt: skip
    cmd = locust_command(run, tmp_path / "workload.json")
    assert cmd[:3] == [sys.executable, "-m", "locust"] and "--headless" in cmd
    assert cmd[cmd.index("--csv") + 1] == str(tmp_path / "locust")
    assert cmd[cmd.index("--html") + 1] == str(tmp_path / "locust.html")
    assert cmd[cmd.index("--json-file") + 1] == str(tmp_path / "locust")
    assert cmd[cmd.index("--run-time") + 1] == "60s"
    assert cmd[cmd.index("--recstack-bootstrap") + 1] == "127.0.0.1:9092"


def test_locust_journeys_run_against_the_echo_server(tmp_path: Path) -> None:
    """A short real Locust run (its own process, as `recstack loadtest` starts it), events off."""
    argv = [sys.executable, "-m", "loadtests.echo_server", "--port", "0"]
    echo = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None
        address = echo.stdout.readline().split()[-1]
        run = LocustRun(host=address, users=4, spawn_rate=4, duration_s=3, out=tmp_path, wait="0.05,0.1")
        workload_file = workload.synthetic_workload().save(tmp_path / "workload.json")
        done = subprocess.run(locust_command(run, workload_file), capture_output=True, text=True, timeout=120)
    finally:
        echo.terminate()
        echo.wait(timeout=10)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_final_stats(tmp_path / "locust.json")
    names = {row["name"] for row in rows}
    assert {"Recommend home", "Rank category", "Rank product", "Aggregated"} <= names
    assert all(row["failures"] == 0 and row["requests"] > 0 for row in rows)
    assert all(row["p99"] is not None and row["p50"] <= row["p99"] for row in rows)
    assert (tmp_path / "locust.html").stat().st_size > 0
    with (tmp_path / "locust_stats.csv").open() as fh:
        assert "99%" in next(csv.reader(fh))
    counts = read_path_counts(tmp_path)
    assert counts["paths"].get("echo", 0) > 0
    assert "| grpc | Rank category |" in render_summary(run, rows, counts, 0)
