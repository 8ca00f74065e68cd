"""The open-loop generator against the bare echo server, and the SLO gate's verdicts.

The rate test is the one timed assertion of the load tools: a modest rate (200/s for 3 s) against
a trivial server, with a generous 5% tolerance.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from loadtests import workload
from loadtests.openloop import GeneratorConfig, GeneratorError, OpenLoopGenerator, make_schedule
from loadtests.servers import free_port
from loadtests.slo_gate import Gate, format_gate, run_gate
from loadtests.stats import summarize_step


def _start_echo(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtests.echo_server", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("listening on"), line
    return process, line.split()[-1]


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def echo_address() -> Iterator[str]:
    process, address = _start_echo()
    yield address
    _stop(process)


@pytest.fixture(scope="module")
def requests() -> list[bytes]:
    return workload.rank_requests(workload.synthetic_workload(), 200, 100)


def test_uniform_schedule_is_evenly_spaced() -> None:
    offsets = make_schedule(200.0, 3.0, "uniform")
    assert len(offsets) == 600
    assert np.allclose(np.diff(offsets), 1 / 200)


def test_poisson_schedule_has_the_exact_count_and_exponential_gaps() -> None:
    offsets = make_schedule(1000.0, 20.0, "poisson", seed=3)
    gaps = np.diff(offsets)
    assert len(offsets) == 20_000 and (gaps >= 0).all() and 0 <= offsets[0] and offsets[-1] <= 20.0
    assert gaps.mean() == pytest.approx(1 / 1000, rel=0.05)
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.1)  # exponential: sd equals the mean


def test_schedule_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        make_schedule(0, 1.0)
    with pytest.raises(ValueError):
        make_schedule(10, 1.0, "bursty")


def test_generator_keeps_its_offered_rate(echo_address: str, requests: list[bytes]) -> None:
    rate, duration = 200.0, 3.0
    with OpenLoopGenerator(echo_address, "Rank", requests, GeneratorConfig(workers=2, channels=2)) as load:
        record = load.run_step(rate, duration, "poisson", seed=1)
    step = summarize_step(record, offered_rate=rate, duration_s=duration)
    assert step["scheduled"] == 600
    assert step["errors"] == {}
    assert step["send_rate"] == pytest.approx(rate, rel=0.05)
    assert step["achieved_rate"] == pytest.approx(rate, rel=0.05)
    assert step["paths"] == {"echo": 600}
    assert step["latency_ms"]["count"] == 600 and step["latency_ms"]["p50"] > 0


def test_shed_calls_are_recorded_by_status(requests: list[bytes]) -> None:
    # At most one call in flight and 20 ms per call: most of a 200/s burst is refused.
    process, address = _start_echo("--delay-ms", "20", "--max-inflight", "1")
    try:
        with OpenLoopGenerator(address, "Rank", requests, GeneratorConfig(workers=1, channels=1)) as load:
            record = load.run_step(200.0, 0.5, "uniform")
    finally:
        _stop(process)
    step = summarize_step(record, offered_rate=200.0, duration_s=0.5)
    assert step["ok"] >= 1
    assert step["errors"].get("RESOURCE_EXHAUSTED", 0) >= 50
    assert set(step["errors"]) == {"RESOURCE_EXHAUSTED"}


def test_recommend_calls(echo_address: str) -> None:
    calls = workload.recommend_requests(workload.synthetic_workload(), 20, k=5)
    with OpenLoopGenerator(echo_address, "Recommend", calls, GeneratorConfig(workers=1, channels=1)) as load:
        record = load.run_step(50.0, 0.4, "uniform")
    assert (record.code == 0).all()


def test_unreachable_server_is_reported() -> None:
    config = GeneratorConfig(workers=1, channels=1, connect_timeout_s=0.5)
    with pytest.raises(GeneratorError, match="cannot connect"):
        with OpenLoopGenerator(f"127.0.0.1:{free_port()}", "Rank", [b""], config):
            pass


def test_slo_gate_passes_and_fails(echo_address: str, requests: list[bytes]) -> None:
    config = GeneratorConfig(workers=1, channels=1)
    passed = run_gate(
        Gate(target=echo_address, rate=50.0, duration_s=1.0, p99_ms=500.0, warmup_s=0), requests, config
    )
    assert passed["passed"], passed["reasons"]
    failed = run_gate(
        Gate(target=echo_address, rate=50.0, duration_s=1.0, p99_ms=0.001, warmup_s=0), requests, config
    )
    assert not failed["passed"] and "p99" in failed["reasons"][0]
    assert "FAIL" in format_gate(Gate(target=echo_address, rate=50.0, duration_s=1.0, p99_ms=0.001), failed)
