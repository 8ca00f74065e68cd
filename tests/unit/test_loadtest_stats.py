"""Latency statistics of the load tools: percentiles on known samples, coordinated omission, summaries."""

from __future__ import annotations

import random

import numpy as np
import pytest

from loadtests.stats import (
    HISTOGRAM_EDGES_MS,
    StepRecord,
    error_mix,
    path_mix,
    percentile,
    percentiles,
    summarize_step,
)


def test_percentiles_of_one_to_a_hundred_are_the_ranks() -> None:
    values = list(range(1, 101))
    random.Random(1).shuffle(values)
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "p99.9": 100.0}


def test_percentiles_of_one_to_a_thousand() -> None:
    values = np.arange(1000, 0, -1)  # order of arrival does not matter
    assert percentiles(values) == {"p50": 500.0, "p95": 950.0, "p99": 990.0, "p99.9": 999.0}
    assert percentile(values, 100) == 1000.0


def test_nearest_rank_never_interpolates() -> None:
    # Nine fast calls and one slow one: p50 is a fast call, p95 and p99 are the slow one.
    values = [1.0] * 9 + [50.0]
    assert percentile(values, 50) == 1.0
    assert percentile(values, 90) == 1.0
    assert percentile(values, 95) == 50.0
    assert percentile(values, 99) == 50.0


def test_single_value_and_empty() -> None:
    assert percentiles([7.5]) == {"p50": 7.5, "p95": 7.5, "p99": 7.5, "p99.9": 7.5}
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "p99.9": None}


@pytest.mark.parametrize("q", [0, -1, 100.1])
def test_percentile_out_of_range_is_refused(q: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0, 2.0], q)


def _record(scheduled, sent, done, code, path, names=("light", "full")) -> StepRecord:
    n = len(scheduled)
    return StepRecord(
        scheduled=np.asarray(scheduled, dtype=float),
        sent=np.asarray(sent, dtype=float),
        done=np.asarray(done, dtype=float),
        code=np.asarray(code, dtype=np.int16),
        path=np.asarray(path, dtype=np.int16),
        degraded=np.zeros(n, dtype=bool),
        path_names=list(names),
    )


def test_latency_counts_from_the_scheduled_time_when_the_send_was_late() -> None:
    # Scheduled at 10.0, sent 0.5 s late (the generator was held up), answered 1 ms after sending.
    record = _record([10.0], [10.5], [10.501], [0], [0])
    assert record.latencies()[0] == pytest.approx(0.501)


def test_latency_counts_from_the_send_when_the_send_was_early() -> None:
    record = _record([10.0], [9.9995], [10.0015], [0], [0])
    assert record.latencies()[0] == pytest.approx(0.002)


def test_merge_orders_by_schedule_and_remaps_paths() -> None:
    a = _record([1.0, 3.0], [1.0, 3.0], [1.1, 3.1], [0, 0], [0, 1], names=("light", "full"))
    b = _record([2.0, 4.0], [2.0, 4.0], [2.1, 4.1], [0, 8], [0, -1], names=("full",))
    merged = StepRecord.merge([a, b])
    assert merged.scheduled.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert [merged.path_names[i] if i >= 0 else None for i in merged.path] == ["light", "full", "full", None]
    assert merged.code.tolist() == [0, 0, 0, 8]


def test_summarize_step_counts_errors_paths_and_rates() -> None:
    n = 100
    scheduled = np.arange(n) * 0.01  # 100/s for 1 s
    done = scheduled + 0.002
    code = np.zeros(n, dtype=int)
    code[:5] = 8  # RESOURCE_EXHAUSTED
    code[5] = 4  # DEADLINE_EXCEEDED
    path = np.where(np.arange(n) % 4 == 0, 1, 0)
    path[code != 0] = -1
    step = summarize_step(
        _record(scheduled, scheduled, done, code, path),
        offered_rate=100.0,
        duration_s=1.0,
        slo_p99_ms=10.0,
        max_error_rate=0.01,
    )
    assert step["scheduled"] == 100 and step["ok"] == 94 and step["errors_total"] == 6
    assert step["errors"] == {"RESOURCE_EXHAUSTED": 5, "DEADLINE_EXCEEDED": 1}
    assert step["error_rate"] == pytest.approx(0.06)
    assert sum(step["paths"].values()) == 94 and set(step["paths"]) == {"light", "full"}
    assert step["latency_ms"]["p99"] == pytest.approx(2.0)
    assert step["achieved_rate"] == pytest.approx(94.0, rel=0.01)
    assert step["send_rate"] == pytest.approx(100.0, rel=0.02)
    assert step["slo_pass"] is False  # 6% errors
    assert sum(step["histogram_ms"]) == 94 and len(step["histogram_ms"]) == len(HISTOGRAM_EDGES_MS) - 1
    assert error_mix(step).startswith("RESOURCE_EXHAUSTED 5.0%")
    assert path_mix(step).startswith("light")


def test_answers_after_the_step_lower_the_achieved_rate() -> None:
    # 100 calls offered in 1 s but the last answer came 2 s after the start: 50/s sustained.
    scheduled = np.arange(100) * 0.01
    done = np.linspace(0.01, 2.0, 100)
    step = summarize_step(
        _record(scheduled, scheduled, done, np.zeros(100), np.zeros(100)), offered_rate=100.0, duration_s=1.0
    )
    assert step["achieved_rate"] == pytest.approx(50.0, rel=0.01)


def test_unanswered_calls_are_errors() -> None:
    step = summarize_step(
        _record([0.0, 0.1], [0.0, 0.1], [0.001, 0.0], [0, -1], [0, -1]), offered_rate=2, duration_s=1
    )
    assert step["errors"] == {"NO_ANSWER": 1}
    assert step["latency_all_ms"]["count"] == 1
