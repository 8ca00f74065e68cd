"""Runs the Locust storefront journeys headless in their own process and summarizes the result.

Locust patches the standard library with gevent when it is imported, so it never runs inside
the ``recstack`` process: this module only prepares the workload file, starts
``python -m locust`` and reads back the CSV statistics it wrote.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CSV_PREFIX = "locust"


@dataclass(frozen=True)
class LocustRun:
    host: str
    users: int
    spawn_rate: float
    duration_s: float
    out: Path
    bootstrap: str = ""  # '' = publish no events
    topic: str = "user-events"
    source: str = "onlineretail"
    wait: str = "0.2,1.0"
    timeout_s: float = 1.0
    processes: int = 1


def locust_command(run: LocustRun, workload_file: Path) -> list[str]:
    out = run.out
    cmd = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless",
        "--host", run.host,
        "--users", str(run.users),
        "--spawn-rate", f"{run.spawn_rate:g}",
        "--run-time", f"{max(1, round(run.duration_s))}s",
        "--stop-timeout", "5",
        "--csv", str(out / CSV_PREFIX),
        "--html", str(out / "locust.html"),
        "--json-file", str(out / CSV_PREFIX),
        "--only-summary",
        "--recstack-workload", str(workload_file),
        "--recstack-topic", run.topic,
        "--recstack-timeout", f"{run.timeout_s:g}",
        "--recstack-wait", run.wait,
        "--recstack-paths-out", str(out / "paths.json"),
    ]  # fmt: skip
    if run.bootstrap:
        cmd += ["--recstack-bootstrap", run.bootstrap]
    if run.processes > 1:
        cmd += ["--processes", str(run.processes)]
    return cmd


def run_locust(run: LocustRun) -> int:
    """Write the workload, run Locust, write ``summary.md``; returns Locust's exit status."""
    from loadtests import workload

    run.out.mkdir(parents=True, exist_ok=True)
    for stale in run.out.glob("paths-*.json"):  # tallies of an earlier run in the same folder
        stale.unlink()
    workload_file = workload.load(run.source).save(run.out / "workload.json")
    cmd = locust_command(run, workload_file)
    print("running:", " ".join(cmd), flush=True)
    status = subprocess.run(cmd, check=False).returncode
    rows = read_final_stats(run.out / f"{CSV_PREFIX}.json") or read_csv_stats(
        run.out / f"{CSV_PREFIX}_stats.csv"
    )
    if rows:
        summary = render_summary(run, rows, read_path_counts(run.out), status)
        (run.out / "summary.md").write_text(summary)
        print(summary)
    return status


def read_final_stats(path: Path) -> list[dict[str, Any]]:
    """Rows for the summary from Locust's ``--json-file`` (its final figures; the CSV files are
    rewritten once a second during the run, so their last version may miss the last second).

    Percentiles are nearest-rank over Locust's response-time buckets (whole milliseconds below
    100 ms, coarser above).
    """
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    rows = [_row_from_entry(e["method"], e["name"], [e]) for e in entries]
    if len(entries) > 1:
        rows.append(_row_from_entry("", "Aggregated", entries))
    return rows


def _row_from_entry(kind: str, name: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    from loadtests.stats import percentiles

    times: dict[float, int] = {}
    for entry in entries:
        for bucket, count in entry.get("response_times", {}).items():
            times[float(bucket)] = times.get(float(bucket), 0) + int(count)
    values: Any = (
        np.repeat(np.fromiter(times.keys(), float), np.fromiter(times.values(), int)) if times else []
    )
    requests = sum(e["num_requests"] for e in entries)
    start = min(e["start_time"] for e in entries)
    end = max(e.get("last_request_timestamp") or start for e in entries)
    return {
        "type": kind,
        "name": name,
        "requests": requests,
        "failures": sum(e["num_failures"] for e in entries),
        "rps": requests / (end - start) if end > start else None,
        **percentiles(values),
        "max": max((e.get("max_response_time") or 0.0) for e in entries),
    }


def read_csv_stats(path: Path) -> list[dict[str, Any]]:
    """Rows for the summary from ``locust_stats.csv`` (used when the JSON file is missing)."""
    if not path.is_file():
        return []
    return [
        {
            "type": row.get("Type", ""),
            "name": row.get("Name", ""),
            "requests": row.get("Request Count", ""),
            "failures": row.get("Failure Count", ""),
            "rps": _float(row.get("Requests/s")),
            "p50": _float(row.get("50%")),
            "p95": _float(row.get("95%")),
            "p99": _float(row.get("99%")),
            "p99.9": _float(row.get("99.9%")),
            "max": _float(row.get("Max Response Time")),
        }
        for row in read_stats(path)
    ]


def read_stats(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def read_path_counts(out: Path) -> dict[str, Any]:
    """The served-path tallies of every Locust process (``paths-<pid>.json``), added up."""
    total: dict[str, Any] = {"paths": {}, "degraded": 0, "events_sent": 0, "events_failed": 0}
    found = False
    for path in sorted(out.glob("paths-*.json")):
        try:
            part = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found = True
        for name, count in part.get("paths", {}).items():
            total["paths"][name] = total["paths"].get(name, 0) + count
        for key in ("degraded", "events_sent", "events_failed"):
            total[key] += part.get(key, 0)
    return total if found else {}


def render_summary(run: LocustRun, rows: list[dict[str, str]], paths: dict[str, Any], status: int) -> str:
    lines = [
        "# Locust storefront load test",
        "",
        f"{run.users} shoppers (spawn rate {run.spawn_rate:g}/s) against {run.host} "
        f"for {run.duration_s:g} s, think time {run.wait} s; events to Kafka: {run.bootstrap or 'off'}. "
        f"Locust exit status {status}.",
        "Locust times calls in a closed loop and rounds to whole milliseconds: use `recstack bench` and "
        "`recstack slo-gate` for open-loop SLO figures.",
        "",
        "| type | name | requests | failures | req/s | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['type']} | {row['name']} | {row['requests']} | {row['failures']} | {_num(row['rps'])} | "
            + " | ".join(_num(row[k]) for k in ("p50", "p95", "p99", "p99.9", "max"))
            + " |"
        )
    if paths:
        served = paths.get("paths", {})
        total = sum(served.values()) or 1
        mix = ", ".join(
            f"{k} {100 * v / total:.0f}%" for k, v in sorted(served.items(), key=lambda kv: -kv[1])
        )
        lines += [
            "",
            f"Served paths: {mix or '-'}; degraded answers: {paths.get('degraded', 0)}; "
            f"events acknowledged: {paths.get('events_sent', 0)}, failed: {paths.get('events_failed', 0)}.",
        ]
    lines += [
        "",
        "Files: `locust_stats.csv`, `locust_stats_history.csv`, `locust_failures.csv`, `locust.html`, "
        "`locust.json` (final figures, used above).",
        "",
    ]
    return "\n".join(lines)


def _float(text: str | None) -> float | None:
    try:
        return float(text or "")
    except ValueError:
        return None


def _num(value: float | int | str | None) -> str:
    if value is None or value == "":
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)
