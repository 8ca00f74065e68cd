"""Figures from the recorded calls of a fault window, and the report: table, JSON and timeline plot.

Times are seconds on the monotonic clock the load generator records (shared by all processes of
the machine). Latencies are the open-loop ones (from each call's scheduled time), percentiles the
nearest-rank ones of :mod:`loadtests.stats`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.stats import STATUS_NAMES, StepRecord, percentile

SLO_P99_MS = 10.0
# A window this long, starting at or after the fault ended, must meet the SLO for service to count as
# recovered; the recovery time is from the fault's end to that window's start.
RECOVERY_WINDOW_S = 1.0
RECOVERY_STEP_S = 0.25
RECOVERY_TARGET_S = 10.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class FaultResult:
    name: str
    title: str
    checked: str
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    # seconds since the run's origin: window start, fault start, fault end, window end
    times: dict[str, float] = field(default_factory=dict)
    skipped: str = ""  # why the fault could not be injected here (then there are no checks)

    @property
    def ok(self) -> bool:
        return not self.skipped and all(c.ok for c in self.checks)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)


def window_stats(record: StepRecord, start: float, end: float) -> dict[str, Any]:
    """Calls scheduled in ``[start, end)``: count, errors by status, p50/p99 of successes, degraded."""
    scheduled = record.scheduled
    chosen = (scheduled >= start) & (scheduled < end)
    answered = record.done > 0
    ok = chosen & answered & (record.code == 0)
    lat_ms = record.latencies()[ok] * 1000.0
    errors: dict[str, int] = {}
    failed = chosen & ~ok
    for code, count in zip(*np.unique(record.code[failed], return_counts=True), strict=True):
        errors[STATUS_NAMES.get(int(code), f"CODE_{int(code)}")] = int(count)
    calls = int(chosen.sum())
    return {
        "calls": calls,
        "ok": int(ok.sum()),
        "errors": errors,
        "error_rate": round(float(failed.sum()) / calls, 6) if calls else 0.0,
        "degraded": int((record.degraded & ok).sum()),
        "p50_ms": _round(percentile(lat_ms, 50)),
        "p99_ms": _round(percentile(lat_ms, 99)),
    }


def recovery_s(record: StepRecord, healed: float, end: float, slo_ms: float = SLO_P99_MS) -> float | None:
    """Seconds from ``healed`` to the first ``RECOVERY_WINDOW_S`` window with calls, no errors and
    p99 within ``slo_ms``; ``None`` when none starts before ``end``."""
    t = healed
    while t + RECOVERY_WINDOW_S <= end + 1e-9:
        stats = window_stats(record, t, t + RECOVERY_WINDOW_S)
        if stats["calls"] and not stats["errors"] and stats["p99_ms"] is not None:
            if stats["p99_ms"] <= slo_ms:
                return round(t - healed, 2)
        t += RECOVERY_STEP_S
    return None


def timeline(record: StepRecord, origin: float, bucket_s: float = 1.0) -> list[dict[str, Any]]:
    """Per ``bucket_s`` of scheduled time: seconds since ``origin``, calls, p99 of successes, error rate."""
    if record.scheduled.size == 0:
        return []
    first = float(record.scheduled.min())
    last = float(record.scheduled.max())
    points = []
    t = first
    while t <= last:
        stats = window_stats(record, t, t + bucket_s)
        if stats["calls"]:
            points.append(
                {
                    "t": round(t - origin, 3),
                    "calls": stats["calls"],
                    "p50_ms": stats["p50_ms"],
                    "p99_ms": stats["p99_ms"],
                    "error_rate": stats["error_rate"],
                }
            )
        t += bucket_s
    return points


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------------------- report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


_SHOWN = ("p99_ms", "errors", "degraded", "recovery_p99_s", "recovery_baseline_s", "recovery_lag_s", "calls")


def figures_text(figures: dict[str, Any]) -> str:
    """The table's figures cell: p99 before/during/after, errors, recovery, then fault-specific ones."""
    parts = []
    if "p99_ms" in figures:
        p = figures["p99_ms"]
        parts.append(f"p99 {_ms(p.get('before'))} / {_ms(p.get('during'))} / {_ms(p.get('after'))} ms")
    if "errors" in figures:
        errors = figures["errors"]
        parts.append("errors " + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"))
    if "degraded" in figures:
        parts.append(f"degraded {figures['degraded']}")
    if "recovery_p99_s" in figures:
        r = figures["recovery_p99_s"]
        parts.append("p99 back < 10 ms " + ("never" if r is None else f"+{r:.1f} s"))
    if figures.get("recovery_baseline_s") is not None and figures.get("recovery_p99_s") is None:
        parts.append(f"p99 back to its pre-fault level +{figures['recovery_baseline_s']:.1f} s")
    if "recovery_lag_s" in figures:
        r = figures["recovery_lag_s"]
        parts.append("lag 0 " + ("never" if r is None else f"+{r:.1f} s"))
    for key, value in figures.items():
        if key in _SHOWN:
            continue
        parts.append(f"{key.replace('_', ' ')} {value}")
    return "; ".join(parts)


def markdown(results: list[FaultResult], meta: dict[str, Any]) -> str:
    """The report: the table, then every check of every fault with its detail."""
    passed = sum(r.ok for r in results)
    lines = [
        "# recstack reliability: faults injected under steady traffic",
        "",
        f"`{meta.get('command', 'recstack chaos')}` on {meta.get('date', '?')}, "
        f"{meta.get('wall_s', 0) / 60:.1f} min. Traffic: {meta.get('event_rate', '?')} events/s into Kafka "
        f"({meta.get('dup_share', 0):.0%} producer duplicates, {meta.get('bad_share', 0):.0%} malformed), "
        f"{meta.get('rank_rate', '?')} Rank + {meta.get('recommend_rate', '?')} Recommend calls/s open loop "
        f"over {meta.get('servers', 2)} ranking servers (client-side round robin), "
        f"{meta.get('consumers', 2)} stream consumers in one group.",
        "",
        f"**{passed} of {len(results)} faults passed every check.** p99 figures are of successful calls "
        "(open loop, from the scheduled time), before the fault / while it lasted / after it; "
        f"recovery: from the end of the fault until a {RECOVERY_WINDOW_S:g} s window has p99 ≤ "
        f"{SLO_P99_MS:g} ms and no errors, and until the stream has applied every record published "
        "before the fault ended.",
        "",
        "| fault | what was checked | result | figures |",
        "|---|---|---|---|",
    ]
    for r in results:
        if r.skipped:
            result = f"skipped: {r.skipped}"
        elif r.ok:
            result = "**pass**"
        else:
            result = "**FAIL**: " + "; ".join(c.name for c in r.checks if not c.ok)
        lines.append(f"| `{r.name}`: {r.title} | {r.checked} | {result} | {figures_text(r.figures)} |")
    lines += ["", "## Checks", ""]
    for r in results:
        lines.append(f"- `{r.name}`" + (f" (skipped: {r.skipped})" if r.skipped else ""))
        for c in r.checks:
            lines.append(
                f"  - {'pass' if c.ok else 'FAIL'}: {c.name}" + (f" ({c.detail})" if c.detail else "")
            )
    if meta.get("plot"):
        lines += ["", f"Timeline: `{meta['plot']}` (p99 and error rate per second, faults shaded)."]
    return "\n".join(lines) + "\n"


def write_report(
    out: Path, results: list[FaultResult], meta: dict[str, Any], points: list[dict[str, Any]]
) -> dict[str, Path]:
    """``reliability.md``, ``results.json`` and ``timeline.png`` in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"plot": out / "timeline.png", "markdown": out / "reliability.md", "json": out / "results.json"}
    plot_timeline(paths["plot"], points, results)
    meta = {**meta, "plot": paths["plot"].name}
    paths["markdown"].write_text(markdown(results, meta))
    payload = {
        "meta": meta,
        "passed": all(r.ok for r in results),
        "faults": [{**asdict(r), "ok": r.ok} for r in results],
        "timeline": points,
    }
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    return paths


def plot_timeline(path: Path, points: list[dict[str, Any]], results: list[FaultResult]) -> None:
    """p99 (log scale) and error rate per second over the whole run, each fault's window shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 6), sharex=True, height_ratios=[3, 1.4])
    points = _with_gaps(points)
    t = [p["t"] for p in points]
    top.plot(t, [_nan(p.get("p99_ms")) for p in points], lw=1.2, color="C0", label="p99")
    top.plot(t, [_nan(p.get("p50_ms")) for p in points], lw=0.8, color="C7", label="p50")
    top.axhline(SLO_P99_MS, color="C3", ls="--", lw=1, label=f"SLO p99 {SLO_P99_MS:g} ms")
    top.set_yscale("log")
    top.set_ylabel("p99 per second (ms)")
    bottom.plot(t, [100.0 * _nan(p.get("error_rate")) for p in points], lw=1.2, color="C1")
    bottom.set_ylabel("errors (%)")
    bottom.set_xlabel("seconds since the first fault window")
    for k, r in enumerate(results):
        if "fault_start" not in r.times:
            continue
        start, end = r.times["fault_start"], r.times.get("fault_end", r.times["fault_start"])
        for ax in (top, bottom):
            ax.axvspan(start, max(end, start + 0.3), color="C3" if not r.ok else "C2", alpha=0.15, lw=0)
        top.text(
            start, 0.98 - 0.07 * (k % 3), r.name, transform=top.get_xaxis_transform(), fontsize=7, va="top"
        )
    top.legend(loc="upper right", fontsize=8)
    top.set_title(
        "recstack chaos: ranking latency and errors, fault windows shaded (green: passed, red: failed)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _with_gaps(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A blank point wherever consecutive points are more than 1.5 s apart (between windows)."""
    out: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda p: p["t"]):
        if out and p["t"] - out[-1]["t"] > 1.5:
            out.append({"t": out[-1]["t"] + 0.5})
        out.append(p)
    return out
