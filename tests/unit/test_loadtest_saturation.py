"""The saturation search, the SLO-rate rule and the report writers, on a simulated server (no timing,
no processes)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from loadtests import report
from loadtests.saturation import (
    QUICK_SEARCH,
    SearchConfig,
    compare,
    real_server_steps,
    search_rates,
    slo_rate_of,
    tight_p99,
)
from loadtests.stats import StepRecord

FAST = dict(warmup_s=0.0, cooldown_s=0.0, step_s=2.0)


class SimulatedServer:
    """Answers every step at once: p99 rises with load and, past ``capacity``, it sheds (or times out).

    Latency follows a queue's shape, ``base / (1 - utilisation)``; calls beyond the capacity fail
    with ``shed_code`` and the rest are served as at 90% load. The path is ``full`` below 70% load
    and ``light`` above.
    """

    def __init__(
        self, capacity: float, base_ms: float = 1.0, shed_code: int = 8, cpu_ms: float | None = None
    ) -> None:
        self.capacity = capacity
        self.base_s = base_ms / 1000.0
        self.shed_code = shed_code
        self.rates: list[float] = []
        self.durations: list[float] = []
        self.cpu_ms = base_ms if cpu_ms is None else cpu_ms  # CPU per call the simulated /proc reports

    def run_step(
        self, rate: float, duration_s: float, schedule: str = "poisson", seed: int = 0
    ) -> StepRecord:
        self.rates.append(rate)
        self.durations.append(duration_s)
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
            # A fixed idle background of 15 ms/s on top of the per-call cost, as a real server has.
            cpu={
                "server": {"seconds": n * self.cpu_ms / 1000 + 0.015 * duration_s, "source": "schedstat"},
                "generator": {"seconds": n * 0.3 / 1000, "source": "schedstat"},
            },
        )


class ColdAtLowRates(SimulatedServer):
    """Misses the SLO below 40/s (one call in 20 finds everything cold: +20 ms), fine when busier."""

    def run_step(
        self, rate: float, duration_s: float, schedule: str = "poisson", seed: int = 0
    ) -> StepRecord:
        record = super().run_step(rate, duration_s, schedule, seed)
        if rate < 40:
            record.done[::20] += 0.020
        return record


def test_default_schedule_steps_25_50_100_200_then_by_half_with_500_calls_each() -> None:
    search = SearchConfig()
    assert list(search.fixed_rates())[:8] == [25, 50, 100, 200, 300, 450, 675, 1012.5]
    assert [search.duration(r) for r in (25, 50, 100, 200, 300)] == [20.0, 10.0, 5.0, 5.0, 5.0]
    server = SimulatedServer(capacity=1000.0)
    result = search_rates(server, SearchConfig(warmup_s=0.0, cooldown_s=0.0))
    fixed = [s for s in result["steps"] if s["phase"] == "fixed"]
    assert [s["offered_rate"] for s in fixed] == [25, 50, 100, 200, 300, 450, 675, 1012.5, 1518.75]
    rechecks = [s for s in result["steps"] if s["phase"] == "fixed-recheck"]
    assert rechecks and all(s["fixed"] for s in rechecks)  # a recheck counts as the fixed step
    assert all(s["scheduled"] >= 500 for s in result["steps"])
    assert fixed[-1]["saturated"]  # the climb ends where throughput stops following
    fine = [s for s in result["steps"] if s["phase"] == "fine"]
    assert len(fine) == 3 and not any(s["fixed"] for s in fine)
    assert all(450 < s["offered_rate"] < 675 for s in fine)  # between the SLO rate and the first miss


def test_schedule_flags_shape_the_steps() -> None:
    search = SearchConfig(rates=(10.0, 40.0), step_factor=2.0, min_calls=100, step_s=1.0, max_rate=300)
    assert list(search.fixed_rates()) == [10, 40, 80, 160]
    assert search.duration(10) == 10.0 and search.duration(160) == 1.0
    with pytest.raises(ValueError, match="increase"):
        SearchConfig(rates=(50.0, 25.0))
    with pytest.raises(ValueError, match="greater than 1"):
        SearchConfig(step_factor=1.0)


def test_a_miss_at_the_lowest_rate_means_no_slo_rate() -> None:
    # Before the fixed schedule, the search started at 100/s and reported 506/s for this server.
    server = ColdAtLowRates(capacity=1000.0)
    result = search_rates(server, SearchConfig(**FAST))
    assert server.rates[:2] == [25.0, 25.0]  # a tail-only miss is measured again
    assert result["slo_rate"] is None
    assert not [s for s in result["steps"] if s["phase"].startswith("fine")]  # nothing to bisect
    assert result["peak_rate"] > 800  # the climb still goes on to saturation


def _step(rate: float, p99: float, fixed: bool = True, phase: str = "fixed", **extra: object) -> dict:
    return {
        "offered_rate": rate,
        "latency_ms": {"p99": p99},
        "slo_pass": p99 <= 10.0,
        "fixed": fixed,
        "phase": phase,
        **extra,
    }


def test_slo_rate_rule_counts_every_fixed_step_from_the_lowest() -> None:
    passing = [_step(r, 4.0) for r in (25, 50, 100, 200, 300)]
    assert slo_rate_of(passing) == 300
    # A miss at 25/s: no SLO rate, however well the higher steps did.
    assert slo_rate_of([_step(25, 12.0), *passing[1:]]) is None
    # A miss at 100/s caps it at 50/s, even though 200 and 300 met the SLO again.
    steps = [_step(25, 4.0), _step(50, 4.0), _step(100, 11.0), _step(200, 4.0), _step(300, 4.0)]
    assert slo_rate_of(steps) == 50
    # A bisection step between 50 and 100 that met the SLO raises it; one above 100 never does.
    bisect = [_step(75, 6.0, fixed=False, phase="fine"), _step(250, 6.0, fixed=False, phase="fine")]
    assert slo_rate_of([*steps, *bisect]) == 75
    # A recheck decides: the first measurement at 25/s, superseded, no longer counts.
    rechecked = [_step(25, 30.0, superseded=True), _step(25, 4.0, phase="fixed-recheck"), *passing[1:]]
    assert slo_rate_of(rechecked) == 300
    assert slo_rate_of([]) is None


def test_tight_p99_holds_only_when_every_step_to_200_is_within_5_ms() -> None:
    search = SearchConfig()
    steps = [_step(25, 4.9), _step(50, 3.0), _step(100, 2.0), _step(200, 4.0), _step(300, 9.0)]
    held = tight_p99(steps, search)
    assert held["held"] is True and held["worst_p99_ms"] == 4.9 and held["worst_at"] == 25
    steps[0] = _step(25, 8.6)  # 8.6 ms at 25/s, as the issue measured
    missed = tight_p99(steps, search)
    assert missed["held"] is False and missed["worst_at"] == 25
    # Saturated at 100/s: 200/s was never reached, so it did not hold.
    assert tight_p99([_step(25, 1.0), _step(50, 1.0), _step(100, 2.0)], search)["held"] is False
    assert tight_p99([], search)["held"] is None


def test_search_finds_the_highest_rate_within_the_slo() -> None:
    # p99 of an exponential is 4.6x its mean: mean 1 ms / (1 - u) <= 10/4.6 ms  <=>  u <= 0.54.
    server = SimulatedServer(capacity=1000.0)
    result = search_rates(server, SearchConfig(rates=(100.0,), step_factor=1.5, fine_steps=4, **FAST))
    assert 400 <= result["slo_rate"] <= 620
    assert result["peak_rate"] == pytest.approx(1000.0, rel=0.1)
    assert not result["slo_rate_is_lower_bound"]
    phases = [s["phase"] for s in result["steps"]]
    assert phases.count("fine") == 4 and phases[0] == "fixed"
    fixed = [s["offered_rate"] for s in result["steps"] if s["phase"] == "fixed"]
    assert fixed == sorted(fixed)


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
    result = search_rates(server, SearchConfig(rates=(100.0,), step_factor=1.5, fine_steps=2, **FAST))
    assert server.rates.count(150.0) == 2
    first, again = (s for s in result["steps"] if s["offered_rate"] == 150.0)
    assert first["superseded"] and not first["slo_pass"]
    assert again["phase"] == "fixed-recheck" and again["slo_pass"] and again["fixed"]
    assert result["slo_rate"] > 300


def test_search_reports_none_when_the_slo_is_never_met() -> None:
    server = SimulatedServer(capacity=100.0, base_ms=20.0)  # p99 ~ 90 ms even when idle
    result = search_rates(server, SearchConfig(rates=(50.0,), step_factor=2.0, **FAST))
    assert result["slo_rate"] is None
    assert result["peak_rate"] > 0


def test_search_stops_at_the_rate_cap() -> None:
    server = SimulatedServer(capacity=1e9)
    result = search_rates(server, SearchConfig(rates=(100.0,), step_factor=2.0, max_rate=500.0, **FAST))
    assert max(server.rates) <= 500.0
    assert result["slo_rate"] == 400.0 and result["slo_rate_is_lower_bound"]


def _synthetic_results(tmp_path: Path, two_workers: bool = False, quick: bool = False) -> dict:
    from dataclasses import asdict

    from loadtests.saturation import BenchConfig

    search = replace(QUICK_SEARCH if quick else SearchConfig(fine_steps=2), **FAST)
    cfg = BenchConfig(out=tmp_path, search=search, quick=quick)
    servers = {}
    # name, capacity, latency base ms, CPU ms per call
    shapes = [("echo", 1600.0, 1.0, 0.5), ("naive", 150.0, 4.0, 8.0), ("real", 1200.0, 1.0, 1.0)]
    if two_workers:
        shapes.append(("real-w2", 2000.0, 1.0, 1.1))
    for name, capacity, base_ms, cpu_ms in shapes:
        server = SimulatedServer(capacity=capacity, base_ms=base_ms, cpu_ms=cpu_ms)
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
            "quick": quick,
            "search": asdict(search),
        },
        "machine": {"cpu": "test cpu", "cpus": 2, "load_average_start": [0.1, 0.2, 0.3]},
        "slo_p99_ms": 10.0,
        "shoppers": {
            "users": 812,
            "checked": 4267,
            "min_recent_items": 20,
            "median_recent_items": 31.0,
            "checked_in_redis": True,
        },
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
    assert len(report.write_plots(results, tmp_path)) == len(report.PLOT_FILES) == 4


def test_summary_states_schedule_users_cpu_and_each_target(tmp_path: Path) -> None:
    results = _synthetic_results(tmp_path)
    summary = report.render_summary(results)
    assert "indicative" not in summary  # a full run
    assert (
        "Fixed steps at 25, 50, 100, 200/s, then x1.5 until saturation, each max(2 s, 500 calls)" in summary
    )
    assert "812 returning shoppers (of 4267 checked) with >= 20 recent items" in summary
    assert "median 31 recent items" in summary
    assert "| naive | none (missed at 25/s) |" in summary
    # CPU per call: real/echo at 25/s is 1.6/1.1 (met, <= 2), at 200/s 1.075/0.575 (not met, > 1.6).
    assert "| real / echo, server CPU per call at 25/s (1.600 / 1.100 ms) | 1.46 | <= 2 | met |" in summary
    assert (
        "| real / echo, server CPU per call at 200/s (1.075 / 0.575 ms) | 1.87 | <= 1.6 | not met |"
        in summary
    )
    assert "| real: p99 <= 5 ms at every fixed step up to 200/s |" in summary
    assert "## CPU per call (ms, fixed steps)" in summary and "| 25 | 1.100 | 0.300 | 8.600 |" in summary
    assert "| errors by code | server CPU ms/call | generator CPU ms/call |" in summary
    comparison = results["comparison"]
    assert comparison["real_over_echo_cpu_at_25"] == pytest.approx(1.6 / 1.1, rel=1e-3)
    assert comparison["real_over_echo_cpu_at_25_met"] is True
    assert comparison["real_over_echo_cpu_at_200_met"] is False
    assert comparison["cpu_ms_per_call"]["echo"]["200"] == pytest.approx(0.575)


def test_quick_summary_says_its_figures_are_indicative(tmp_path: Path) -> None:
    summary = report.render_summary(_synthetic_results(tmp_path, quick=True))
    assert summary.startswith("# Saturation benchmark\n\n**Quick run: these figures are indicative only**")
    assert "The targets are judged by the full run: `recstack bench` without `--quick`." in summary
    assert "each max(2 s, 100 calls) long" in summary


def test_overload_verdict_names_errors_other_than_resource_exhausted(tmp_path: Path) -> None:
    results = _synthetic_results(tmp_path)
    overload = results["servers"]["real"]["overload"]
    overload["errors"] = {"RESOURCE_EXHAUSTED": 300, "DEADLINE_EXCEEDED": 3}
    summary = report.render_summary(results)
    assert "errors other than RESOURCE_EXHAUSTED were seen (RESOURCE_EXHAUSTED 300" in summary
    assert "| only RESOURCE_EXHAUSTED | not met |" in summary
    overload["errors"] = {"RESOURCE_EXHAUSTED": 300}
    results["comparison"] = compare(results)
    assert results["comparison"]["overload_only_resource_exhausted"] is True
    assert "Overload: the only errors were RESOURCE_EXHAUSTED (RESOURCE_EXHAUSTED 300" in (
        report.render_summary(results)
    )
