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
    stats_file = run.out / f"{CSV_PREFIX}_stats.csv"
    if stats_file.is_file():
        summary = render_summary(run, read_stats(stats_file), read_path_counts(run.out), status)
        (run.out / "summary.md").write_text(summary)
        print(summary)
    return status


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
        f"{run.users} shoppers (spawn rate {run.spawn_rate:g}/s) against {run.host} for {run.duration_s:g} s, "
        f"think time {run.wait} s; events to Kafka: {run.bootstrap or 'off'}. Locust exit status {status}.",
        "Locust times calls in a closed loop and rounds to whole milliseconds: use `recstack bench` and "
        "`recstack slo-gate` for open-loop SLO figures.",
        "",
        "| type | name | requests | failures | req/s | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            "| {t} | {n} | {r} | {f} | {rps} | {p50} | {p95} | {p99} | {p999} | {mx} |".format(
                t=row.get("Type", ""),
                n=row.get("Name", ""),
                r=row.get("Request Count", ""),
                f=row.get("Failure Count", ""),
                rps=_num(row.get("Requests/s")),
                p50=row.get("50%", ""),
                p95=row.get("95%", ""),
                p99=row.get("99%", ""),
                p999=row.get("99.9%", ""),
                mx=_num(row.get("Max Response Time")),
            )
        )
    if paths:
        served = paths.get("paths", {})
        total = sum(served.values()) or 1
        mix = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(served.items(), key=lambda kv: -kv[1]))
        lines += [
            "",
            f"Served paths: {mix or '-'}; degraded answers: {paths.get('degraded', 0)}; "
            f"events acknowledged: {paths.get('events_sent', 0)}, failed: {paths.get('events_failed', 0)}.",
        ]
    lines += ["", "Files: `locust_stats.csv`, `locust_stats_history.csv`, `locust_failures.csv`, `locust.html`.", ""]
    return "\n".join(lines)


def _num(text: str | None) -> str:
    try:
        return f"{float(text or ''):.1f}"
    except ValueError:
        return text or ""
