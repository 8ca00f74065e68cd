"""benchmarks/cold_forward_bench.py: its arguments, figures and table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "cold_forward_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cold_forward_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_issue_s_grid(bench):
    args = bench.parse_args(["--model", "m"])
    assert args.forms == ("aoti", "torchscript")
    assert args.requests == (1, 2, 4, 8, 32)
    assert args.gaps_ms == (0.0, 10.0, 40.0)
    assert args.idle_kinds == ("sleep",)
    assert (args.candidates, args.history, args.repeats, args.path) == (100, 30, 40, "routed")


def test_lists_parse_and_bad_values_are_refused_by_name(bench, capsys):
    args = bench.parse_args(
        ["--model", "m", "--forms", "torchscript,aoti,aoti", "--requests", "1,8", "--gaps-ms", "0,2.5"]
    )
    assert args.forms == ("torchscript", "aoti") and args.requests == (1, 8) and args.gaps_ms == (0.0, 2.5)
    for bad, field in (
        (["--forms", "aoti,tensorrt"], "--forms"),
        (["--forms", "onnxruntime"], "--forms"),  # retired (docs/MODEL.md, "Served form")
        (["--requests", "0,4"], "--requests"),
        (["--requests", "a"], "--requests"),
        (["--gaps-ms", "-1"], "--gaps-ms"),
        (["--repeats", "0"], "--repeats"),
        (["--idle-kinds", "nap"], "--idle-kinds"),
        (["--path", "fast"], "--path"),
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(["--model", "m", *bad])
        assert field in capsys.readouterr().err


def test_summary_is_median_and_p90_in_microseconds(bench):
    seconds = [k / 1e6 for k in range(1, 11)]  # 1..10 µs
    assert bench.summarize(seconds) == {"median_us": 5.5, "p90_us": 9.1}


def test_table_bolds_the_lowest_cpu_median_and_marks_a_missing_form(bench):
    def fig(cpu, wall):
        return {
            "cpu": {"median_us": cpu, "p90_us": cpu + 10},
            "wall": {"median_us": wall, "p90_us": wall + 20},
        }

    def row(requests, gap_ms, idle, **forms):
        return {"requests": requests, "gap_ms": gap_ms, "idle": idle, "forms": forms}

    rows = [
        row(1, 0.0, "sleep", aoti=fig(200, 210), torchscript=fig(600, 590)),
        row(32, 40.0, "sleep", aoti=fig(3100, 3000), torchscript=fig(2900, 2950)),
        row(8, 10.0, "thrash", aoti=fig(1500, 1600)),
    ]
    table = bench.markdown_table(rows, ["aoti", "torchscript", "eager"])
    lines = table.splitlines()
    assert lines[2].startswith("| requests | gap | aoti CPU µs | aoti wall µs | torchscript CPU µs")
    assert lines[3].count("---:") == 1 + 2 * 3
    assert lines[4] == "| 1 | back to back | **200 / 210** | 210 / 230 | 600 / 610 | 590 / 610 | n/a | n/a |"
    assert lines[5] == (
        "| 32 | after 40 ms idle | 3,100 / 3,110 | 3,000 / 3,020 "
        "| **2,900 / 2,910** | 2,950 / 2,970 | n/a | n/a |"
    )
    # A lone form is not "fastest" of anything; a non-sleep idle says what it was.
    assert (
        lines[6] == "| 8 | after 10 ms cache thrash | 1,500 / 1,510 | 1,600 / 1,620 | n/a | n/a | n/a | n/a |"
    )


def test_model_bench_refuses_an_unknown_part_and_forms_without_a_model(capsys):
    spec = importlib.util.spec_from_file_location("model_bench", BENCH.parent / "model_bench.py")
    model_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_bench)
    with pytest.raises(SystemExit):
        model_bench.main(["--parts", "dense,speed"])
    assert "--parts: unknown speed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        model_bench.main(["--parts", "forms"])
    assert "--parts forms needs --model" in capsys.readouterr().err
