"""``recstack loadtest``, ``bench`` and ``slo-gate``: flags, environment variables, the Locust run."""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtests import workload
from loadtests.cli import bench_config, duration, register
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


def _bench_config(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in ("RECSTACK_QUICK", "RECSTACK_RATES", "RECSTACK_MIN_CALLS", "RECSTACK_STEP_FACTOR"):
        monkeypatch.delenv(name, raising=False)
    return bench_config(build_parser().parse_args(argv))


def test_bench_full_schedule_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _bench_config(["bench"], monkeypatch)
    assert not cfg.quick
    assert cfg.search.rates == (25.0, 50.0, 100.0, 200.0)
    assert cfg.search.step_factor == 1.5 and cfg.search.min_calls == 500 and cfg.search.step_s == 5.0
    assert cfg.min_recent_items == 20 and cfg.min_users == 50


def test_bench_schedule_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["bench", "--rates", "10,20,40", "--step-factor", "2", "--min-calls", "300",
            "--step-duration", "2s", "--max-steps", "6", "--fine-steps", "0", "--min-recent-items", "30",
            "--min-users", "10"]  # fmt: skip
    cfg = _bench_config(argv, monkeypatch)
    assert list(cfg.search.fixed_rates()) == [10, 20, 40, 80, 160, 320]
    assert cfg.search.duration(10) == 30.0 and cfg.search.duration(320) == 2.0
    assert cfg.search.fine_steps == 0 and cfg.min_recent_items == 30 and cfg.min_users == 10


@pytest.mark.parametrize("rates", ["", "50,25", "0,10", "ten"])
def test_bench_rejects_bad_rates(rates: str) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "--rates", rates])


def test_demo_runs_the_quick_bench(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from loadtests.saturation import QUICK_SEARCH
    from recstack.demo import bench_args

    argv = bench_args(tmp_path / "models", "redis://127.0.0.1:6379/0", tmp_path / "bench")
    cfg = _bench_config(argv, monkeypatch)
    assert cfg.quick and cfg.search.rates == QUICK_SEARCH.rates == (25.0, 50.0, 100.0, 200.0)
    assert cfg.search.min_calls == 100 and cfg.search.step_factor == 2.0
    assert cfg.models == str(tmp_path / "models") and cfg.out == tmp_path / "bench"
    assert cfg.min_recent_items == 20  # the demo's shoppers are returning ones too


def test_quick_bench_measures_latency_and_cpu_of_the_echo_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The demo's code path end to end on the echo server, with a tiny schedule: real processes,
    real /proc readings, the report written."""
    from loadtests.saturation import run_bench

    argv = ["bench", "--quick", "--servers", "echo", "--out", str(tmp_path), "--rates", "40,80",
            "--max-steps", "2", "--min-calls", "20", "--step-duration", "0.3s", "--fine-steps", "0",
            "--workers", "1", "--channels", "1"]  # fmt: skip
    cfg = _bench_config(argv, monkeypatch)
    requests = workload.rank_requests(workload.synthetic_workload(), 50, 20)
    results = run_bench(cfg, requests=requests)
    echo = results["servers"]["echo"]
    assert echo["status"] == "ok", echo["error"]
    fixed = [s for s in echo["steps"] if s["fixed"] and not s.get("superseded")]
    assert [s["offered_rate"] for s in fixed] == [40.0, 80.0]
    for step in fixed:
        assert step["completed"] == step["ok"] > 0
        assert 0 < step["cpu"]["server"]["ms_per_call"] < 1_000
        assert 0 < step["cpu"]["generator"]["ms_per_call"] < 1_000
    assert echo["idle_cpu"]["server_ms_per_s"] >= 0
    summary = (tmp_path / "summary.md").read_text()
    assert "indicative only" in summary and "| 40 | " in summary
    assert (tmp_path / "cpu_per_call.png").stat().st_size > 10_000


def test_sigterm_unwinds_the_bench_like_ctrl_c_so_its_cleanup_runs():
    import os
    import signal

    from loadtests.cli import interrupt_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    cleaned: list[str] = []
    try:
        interrupt_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode
            finally:
                cleaned.append("servers stopped, experiment ended")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert cleaned == ["servers stopped, experiment ended"]
