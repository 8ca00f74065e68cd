"""The saturation search and the report writers, on a simulated server (no timing, no processes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loadtests import report
from loadtests.saturation import SearchConfig, compare, real_server_steps, search_rates
from loadtests.stats import StepRecord

FAST = dict(warmup_s=0.0, cooldown_s=0.0, step_s=2.0)


class SimulatedServer:
    """Answers every step at once: p99 rises with load and, past ``capacity``, it sheds (or times out).

    Latency follows a queue's shape, ``base / (1 - utilisation)``; calls beyond the capacity fail
    with ``shed_code`` and the rest are served as at 90% load. The path is ``full`` below 70% load
    and ``light`` above.
    """

    def __init__(self, capacity: float, base_ms: float = 1.0, shed_code: int = 8) -> None:
        self.capacity = capacity
        self.base_s = base_ms / 1000.0
        self.shed_code = shed_code
        self.rates: list[float] = []

    def run_step(
        self, rate: float, duration_s: float, schedule: str = "poisson", seed: int = 0
    ) -> StepRecord:
        self.rates.append(rate)
        n = int(round(rate * duration_s))
        scheduled = np.sort(np.random.default_rng(seed).uniform(0, duration_s, n)) + 100.0
        util = min(rate / self.capacity, 0.9)  # past capacity, shedding keeps the queue bounded
        rng = np.random.default_rng(seed + 1)
        service = rng.exponential(self.base_s / (1.0 - util), n)
        code = np.zeros(n, dtype=np.int16)
        if rate > self.capacity:
            code[rng.random(n) < 1.0 - self.capacity / rate] = self.shed_code
        path = np.where(code == 0, 0 if util < 0.7 else 1, -1).astype(np.int16)
        return StepRecord(
            scheduled=scheduled,
            sent=scheduled,
            done=scheduled + service,
            code=code,
            path=path,
            degraded=np.zeros(n, dtype=bool),
            path_names=["full", "light"],
        )


def test_search_finds_the_highest_rate_within_the_slo() -> None:
    # p99 of an exponential is 4.6x its mean: mean 1 ms / (1 - u) <= 10/4.6 ms  <=>  u <= 0.54.
    server = SimulatedServer(capacity=1000.0)
    result = search_rates(server, SearchConfig(start_rate=100.0, step_factor=1.5, fine_steps=4, **FAST))
    assert 400 <= result["slo_rate"] <= 620
    assert result["peak_rate"] == pytest.approx(1000.0, rel=0.1)
    assert not result["slo_rate_is_lower_bound"]
    phases = [s["phase"] for s in result["steps"]]
    assert phases.count("fine") == 4 and phases[0] == "coarse"
    coarse = [s["offered_rate"] for s in result["steps"] if s["phase"] == "coarse"]
    assert coarse == sorted(coarse)


class StalledOnce(SimulatedServer):
    """A simulated server whose first step at ``stall_rate`` is spoiled by a 50 ms stall of the machine."""

    def __init__(self, capacity: float, stall_rate: float) -> None:
        super().__init__(capacity)
        self.stall_rate = stall_rate

    def run_step(
        self, rate: float, duration_s: float, schedule: str = "poisson", seed: int = 0
    ) -> StepRecord:
        record = super().run_step(rate, duration_s, schedule, seed)
        if rate == self.stall_rate and self.rates.count(rate) == 1:
            record.done[: len(record.done) // 20] += 0.05
        return record


def test_a_miss_is_measured_again_before_it_ends_the_climb() -> None:
    server = StalledOnce(capacity=1000.0, stall_rate=150.0)
    result = search_rates(server, SearchConfig(start_rate=100.0, step_factor=1.5, fine_steps=2, **FAST))
    assert server.rates.count(150.0) == 2
    first, again = (s for s in result["steps"] if s["offered_rate"] == 150.0)
    assert first["superseded"] and not first["slo_pass"]
    assert again["phase"] == "coarse-recheck" and again["slo_pass"]
    assert result["slo_rate"] > 300


def test_search_steps_down_when_even_the_start_rate_misses() -> None:
    server = SimulatedServer(capacity=200.0)
    result = search_rates(
        server, SearchConfig(start_rate=400.0, step_factor=2.0, fine_steps=1, min_rate=20, **FAST)
    )
    assert "descend" in [s["phase"] for s in result["steps"]]
    assert result["slo_rate"] is not None and result["slo_rate"] < 200


def test_search_reports_none_when_the_slo_is_never_met() -> None:
    server = SimulatedServer(capacity=100.0, base_ms=20.0)  # p99 ~ 90 ms even when idle
    result = search_rates(server, SearchConfig(start_rate=50.0, step_factor=2.0, min_rate=20, **FAST))
    assert result["slo_rate"] is None
    assert result["peak_rate"] > 0


def test_search_stops_at_the_rate_cap() -> None:
    server = SimulatedServer(capacity=1e9)
    result = search_rates(server, SearchConfig(start_rate=100.0, step_factor=2.0, max_rate=500.0, **FAST))
    assert max(server.rates) <= 500.0
    assert result["slo_rate"] == 400.0 and result["slo_rate_is_lower_bound"]


def _synthetic_results(tmp_path: Path, two_workers: bool = False) -> dict:
    from loadtests.saturation import BenchConfig

    search = SearchConfig(start_rate=100.0, step_factor=1.5, fine_steps=2, **FAST)
    cfg = BenchConfig(out=tmp_path, search=search)
    servers = {}
    capacities = [("echo", 1600.0), ("naive", 150.0), ("real", 1200.0)]
    if two_workers:
        capacities.append(("real-w2", 2000.0))
    for name, capacity in capacities:
        server = SimulatedServer(capacity=capacity, base_ms=1.0 if name != "naive" else 4.0)
        result = {
            "name": name,
            "status": "ok",
            "error": None,
            "startup_s": 1.0,
            **search_rates(server, search),
        }
        if name == "real":
            real_server_steps(cfg, servers["naive"]["peak_rate"])(server, result)
        servers[name] = result
    results = {
        "started_at": "2026-01-01T00:00:00+00:00",
        "config": {
            "candidates": 100,
            "source": "onlineretail",
            "overload_factor": 1.5,
            "search": vars(search),
        },
        "machine": {"cpu": "test cpu", "cpus": 2, "load_average_start": [0.1, 0.2, 0.3]},
        "slo_p99_ms": 10.0,
        "servers": servers,
    }
    results["comparison"] = compare(results)
    return results


def test_real_server_gets_target_naive_peak_and_overload_steps(tmp_path: Path) -> None:
    results = _synthetic_results(tmp_path)
    real = results["servers"]["real"]
    assert real["target"]["offered_rate"] == pytest.approx(real["slo_rate"])
    assert real["at_naive_peak"]["offered_rate"] == pytest.approx(results["servers"]["naive"]["peak_rate"])
    assert real["overload"]["offered_rate"] == pytest.approx(1.5 * real["slo_rate"])
    assert set(real["overload"]["errors"]) <= {"RESOURCE_EXHAUSTED"}
    comparison = results["comparison"]
    assert comparison["real_over_echo_slo_rate"] == pytest.approx(
        real["slo_rate"] / results["servers"]["echo"]["slo_rate"], rel=1e-3
    )
    assert comparison["real_over_naive_peak"] > 5


def test_summary_and_plots_are_written(tmp_path: Path) -> None:
    results = _synthetic_results(tmp_path)
    results["servers"]["broken"] = {"name": "broken", "status": "failed", "error": "exited with code 1\nmore"}
    (tmp_path / "results.json").write_text(json.dumps(results))
    loaded = report.load_results(tmp_path / "results.json")
    summary = report.write_summary(loaded, tmp_path / "summary.md").read_text()
    assert "| echo |" in summary and "| naive |" in summary and "| real |" in summary
    assert "real / echo" in summary and "real / naive" in summary
    assert "overload" in summary and "RESOURCE_EXHAUSTED" in summary
    assert "failed: exited with code 1" in summary
    written = report.write_plots(loaded, tmp_path)
    assert [p.name for p in written] == list(report.PLOT_FILES)
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_two_worker_server_is_compared_with_one_in_the_same_run(tmp_path: Path) -> None:
    results = _synthetic_results(tmp_path, two_workers=True)
    servers, comparison = results["servers"], results["comparison"]
    assert comparison["real_w2_over_real_slo_rate"] == pytest.approx(
        servers["real-w2"]["slo_rate"] / servers["real"]["slo_rate"], rel=1e-3
    )
    assert comparison["real_w2_over_real_slo_rate"] > 1
    summary = report.render_summary(results)
    assert "| real-w2 |" in summary and "real-w2 / real (2 vs 1 worker processes)" in summary
    one_worker_only = _synthetic_results(tmp_path)["comparison"]
    assert not any(key.startswith("real_w2") for key in one_worker_only)  # only when measured


def test_plots_survive_a_run_where_every_server_failed(tmp_path: Path) -> None:
    results = {
        "servers": {"real": {"name": "real", "status": "failed", "error": "no model"}},
        "slo_p99_ms": 10.0,
    }
    assert "failed: no model" in report.render_summary(results)
    assert len(report.write_plots(results, tmp_path)) == 3
