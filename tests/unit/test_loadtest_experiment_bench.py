"""``recstack bench --experiments`` / ``--experiment-ladder``: the round order, the pooled figures,
the verdict against the issue's targets and the report rows, on a simulated server (no processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_loadtest_cli import _parser
from test_loadtest_saturation import SimulatedServer, _synthetic_results

from loadtests import experiment_bench as eb
from loadtests import report
from loadtests.cli import bench_config
from loadtests.saturation import compare, search_rates
from recstack.errors import UserError

METRICS = """\
# HELP recstack_shadow_batches_total Shadow batches.
# TYPE recstack_shadow_batches_total counter
recstack_shadow_batches_total{outcome="scored"} 12.0
recstack_shadow_batches_total{outcome="dropped"} 3.0
recstack_shadow_batches_total{outcome="over_budget"} 5.0
recstack_shadow_batches_total{outcome="failed"} 0.0
# TYPE recstack_impressions_published_total counter
recstack_impressions_published_total 400.0
# TYPE recstack_impressions_dropped_total counter
recstack_impressions_dropped_total 0.0
# TYPE recstack_experiment_generation gauge
recstack_experiment_generation 7.0
"""


def test_rounds_interleave_every_state_reversing_the_order_each_round() -> None:
    assert eb.round_plan(("none", "ab", "shadow"), 2) == [
        (0, "none"), (0, "ab"), (0, "shadow"), (1, "shadow"), (1, "ab"), (1, "none"),
    ]  # fmt: skip
    plan = eb.round_plan(eb.STATES, 4)
    assert [s for _, s in plan].count("shadow") == 4 and len(plan) == 12
    with pytest.raises(ValueError, match="rounds"):
        eb.round_plan(eb.STATES, 0)


def test_server_counters_are_parsed_and_differenced() -> None:
    before = eb.parse_metrics(METRICS)
    assert before["generation"] == 7
    assert before["shadow_batches"] == {"scored": 12, "dropped": 3, "over_budget": 5, "failed": 0}
    after = eb.parse_metrics(METRICS.replace("} 12.0", "} 30.0").replace("total 400.0", "total 650.0"))
    delta = eb.counter_delta(before, after)
    assert delta["shadow_batches"]["scored"] == 18 and delta["shadow_batches"]["dropped"] == 0
    assert delta["impressions_published"] == 250


class CostlyShadow(SimulatedServer):
    """CPU per call and latency depend on the experiment state the rounds set."""

    COST = {"none": (1.0, 1.0), "ab": (1.1, 1.2), "shadow": (1.1, 1.5)}  # latency base ms, CPU ms

    def __init__(self) -> None:
        super().__init__(capacity=1000.0)
        self.state = "none"
        self.shadow_scored = 0
        self.order: list[str] = []

    def set_state(self, state: str) -> None:
        self.state = state
        self.base_s, self.cpu_ms = (x / 1000 if i == 0 else x for i, x in enumerate(self.COST[state]))

    def run_step(self, rate, duration_s, schedule="poisson", seed=0):  # type: ignore[no-untyped-def]
        record = super().run_step(rate, duration_s, schedule, seed)
        if duration_s > 1.0:  # the measured step, not the warm-up
            self.order.append(self.state)
            self.shadow_scored += int(rate * duration_s) // 4 if self.state == "shadow" else 0
        return record

    def counters(self) -> dict:
        return {"shadow_batches": {"scored": self.shadow_scored}, "impressions_published": 0}


def _rounds(server: CostlyShadow) -> dict:
    return eb.run_rounds(
        server,
        server.set_state,
        server.counters,
        rate=100.0,
        rounds=2,
        min_calls=500,
        step_s=2.0,
        warmup_s=0.5,
        schedule="poisson",
        seed=0,
    )


def test_rounds_pool_each_state_and_judge_the_shadow_against_no_experiment() -> None:
    server = CostlyShadow()
    result = _rounds(server)
    assert server.order == ["none", "ab", "shadow", "shadow", "ab", "none"]
    assert [s["phase"] for s in result["steps"]][:2] == ["none round 1", "ab round 1"]
    assert result["calls_per_round"] == 500
    states = result["states"]
    assert states["none"]["calls"] == 1000  # both rounds' calls in one p99
    assert len(states["shadow"]["round_p99_ms"]) == 2
    idle = 0.015 * 5.0 / 500 * 1000  # the simulated server's 15 ms/s background, per call (ms)
    assert states["none"]["cpu_ms_per_call"] == pytest.approx(1.0 + idle, rel=0.01)
    assert states["shadow"]["counters"]["shadow_batches"]["scored"] == 250
    assert states["none"]["counters"]["shadow_batches"]["scored"] == 0
    verdict = result["verdict"]
    assert verdict["shadow"]["cpu_delta"] == pytest.approx((1.5 + idle) / (1.0 + idle) - 1, abs=0.01)
    assert verdict["shadow"]["cpu_met"] is False
    assert verdict["ab"]["cpu_delta"] == pytest.approx((1.2 + idle) / (1.0 + idle) - 1, abs=0.01)
    assert verdict["shadow"]["p99_delta_ms"] > 0
    assert verdict["shadow"]["cpu_delta_vs_ab"] == pytest.approx((1.5 + idle) / (1.2 + idle) - 1, abs=0.01)


def test_verdict_meets_the_targets_within_1_ms_and_10_percent() -> None:
    def state(p99: float, cpu: float) -> dict:
        return {"latency_ms": {"p99": p99}, "cpu_ms_per_call": cpu}

    ok = eb.verdict({"none": state(4.0, 2.0), "ab": state(4.5, 2.1), "shadow": state(4.9, 2.19)})
    assert ok["shadow"]["p99_met"] is True and ok["shadow"]["cpu_met"] is True
    bad = eb.verdict({"none": state(4.0, 2.0), "ab": state(4.5, 2.1), "shadow": state(5.2, 2.3)})
    assert bad["shadow"]["p99_met"] is False and bad["shadow"]["cpu_met"] is False
    missing = eb.verdict({"none": state(4.0, 2.0), "ab": {}, "shadow": {}})
    assert missing["shadow"]["p99_met"] is None and missing["shadow"]["cpu_met"] is None
    assert ok["round_p99_spread_ms"] is None  # no rounds given


def test_a_p99_verdict_within_the_rounds_noise_is_flagged(tmp_path: Path) -> None:
    results = _synthetic_results(tmp_path)
    rounds = _rounds(CostlyShadow())
    rounds["states"]["ab"]["round_p99_ms"] = [20.0, 560.0]  # a busy machine: rounds 540 ms apart
    rounds["verdict"] = eb.verdict(rounds["states"])
    assert rounds["verdict"]["round_p99_spread_ms"] == pytest.approx(540.0)
    results["experiments"] = {"status": "ok", "slo_rate": 200.0, "rate_fraction": 0.5, **rounds}
    assert "rounds differ by up to 540.00 ms in p99" in report.render_summary(results)
    quiet = _rounds(CostlyShadow())
    assert quiet["verdict"]["round_p99_spread_ms"] < 1.0
    results["experiments"] = {"status": "ok", "slo_rate": 200.0, "rate_fraction": 0.5, **quiet}
    assert "Warning" not in report.render_summary(results).split("## Experiments")[1]


def test_report_shows_the_rounds_the_verdict_and_the_experiment_ladder(tmp_path: Path) -> None:
    results = _synthetic_results(tmp_path)
    ab = SimulatedServer(capacity=1000.0, base_ms=1.1, cpu_ms=1.2)
    results["servers"]["real-ab"] = {
        "name": "real-ab",
        "status": "ok",
        "startup_s": 1.0,
        **search_rates(ab, _fast()),
    }
    results["comparison"] = compare(results)
    results["experiments"] = {
        "status": "ok",
        "slo_rate": results["servers"]["real"]["slo_rate"],
        "rate_fraction": 0.5,
        "versions": {"A": "v1", "B": "v1-copy", "C": "v1-copy2"},
        "impressions_topic": "rank-impressions",
        **_rounds(CostlyShadow()),
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    loaded = report.load_results(tmp_path / "results.json")
    summary = report.render_summary(loaded)
    assert "## Experiments: what they cost the real server" in summary
    for state in ("none", "ab", "shadow"):
        assert f"\n| {state} | 1000 |" in summary
    assert "| shadow | 1000 |" in summary and "| 250 / 0 / 0 |" in summary
    assert "| CPU per call difference | +43.5% | <= 10% | not met |" in summary
    assert "real-ab (A/B experiment on): max rate" in summary
    assert "real-ab / echo, max rate" in summary and "real-ab / echo, server CPU per call at 200/s" in summary
    comparison = loaded["comparison"]
    assert comparison["real_ab_over_real_slo_rate"] is not None
    assert "| real-ab |" in summary  # in the servers table and the CPU table like any server
    written = report.write_plots(loaded, tmp_path)
    assert (tmp_path / "cpu_per_call.png") in written


def test_report_says_when_the_rounds_failed(tmp_path: Path) -> None:
    results = _synthetic_results(tmp_path)
    results["experiments"] = {"status": "failed", "error": "experiment 'x' is running\nin db 0"}
    summary = report.render_summary(results)
    assert "The rounds failed: experiment 'x' is running in db 0" in summary
    results["experiments"] = {"status": "ok", "rate_given": True, "slo_rate": None, **_rounds(CostlyShadow())}
    assert "The real server at 100.0/s (as given; its max rate at the SLO in this run: -/s)" in (
        report.render_summary(results)
    )


def _fast():  # type: ignore[no-untyped-def]
    from loadtests.saturation import SearchConfig

    return SearchConfig(fine_steps=1, warmup_s=0.0, cooldown_s=0.0, step_s=2.0)


def test_flags_default_off_and_need_kafka_and_the_real_server() -> None:
    plain = bench_config(_parser().parse_args(["bench"]))
    assert (plain.experiments, plain.experiment_ladder, plain.experiment_versions) == (False, False, ())
    cfg = bench_config(
        _parser().parse_args(
            ["bench", "--experiments", "--experiment-ladder", "--kafka-bootstrap", "127.0.0.1:9092",
             "--experiment-versions", "v20240101-000000,v20240102-000000", "--experiment-rounds", "3"]
        )
    )  # fmt: skip
    assert cfg.experiments and cfg.experiment_ladder and cfg.experiment_rounds == 3
    assert (cfg.experiment_rate_fraction, cfg.experiment_rate, cfg.impressions_topic) == (
        0.5, 0.0, "rank-impressions",
    )  # fmt: skip
    assert cfg.experiment_versions == ("v20240101-000000", "v20240102-000000")
    with pytest.raises(UserError, match="--kafka-bootstrap"):
        bench_config(_parser().parse_args(["bench", "--experiments"]))
    with pytest.raises(UserError, match="real server"):
        bench_config(
            _parser().parse_args(
                ["bench", "--experiments", "--kafka-bootstrap", "k:9092", "--servers", "echo"]
            )
        )
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "--experiment-versions", "v1"])


def test_versions_are_copied_into_a_private_folder_keeping_the_default(tmp_path: Path) -> None:
    from models.artifacts import REQUIRED, list_versions, read_default, write_manifest

    models = tmp_path / "models"
    for name in ("v20240101-000000", "v20240102-000000"):
        (models / name).mkdir(parents=True)
        for file in REQUIRED:
            (models / name / file).write_text(f"{name} {file}")
        write_manifest(models / name)
    folder, versions = eb.prepare_versions(models, tmp_path / "out", ())
    assert folder == tmp_path / "out" / "experiment-models"
    assert versions["A"] == "v20240102-000000" != versions["B"] != versions["C"] != versions["A"]
    assert {p.name for p in list_versions(folder)} == set(versions.values())
    assert read_default(folder) == "v20240102-000000"
    assert not (models / versions["B"]).exists()  # the user's folder is left alone
    given = eb.prepare_versions(models, tmp_path / "out", ("v20240101-000000", "v20240102-000000"))
    assert given == (models, {"A": "v20240101-000000", "B": "v20240102-000000", "C": "v20240102-000000"})
    with pytest.raises(eb.ExperimentBenchError, match="v20990101-000000 not in"):
        eb.prepare_versions(models, tmp_path / "out", ("v20240101-000000", "v20990101-000000"))
