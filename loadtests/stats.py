"""Latency statistics of one load step: percentiles, error mix, path mix, histogram.

Percentiles use the nearest-rank definition: the p-th percentile is the smallest recorded value
such that at least p% of the samples are at or below it. It is always one of the samples
(never an interpolation between two), which is what latency SLOs mean by "p99 <= 10 ms".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES: tuple[float, ...] = (50.0, 95.0, 99.0, 99.9)
# Log-spaced latency histogram edges in ms: 20 bins per decade from 0.05 ms to 5 s.
HISTOGRAM_EDGES_MS: tuple[float, ...] = tuple(float(x) for x in np.geomspace(0.05, 5000.0, 101))
# grpc.StatusCode names by their numeric value, without importing grpc here.
STATUS_NAMES: dict[int, str] = {
    -1: "NO_ANSWER",  # the generator gave up waiting (recorded, never silently dropped)
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}
# Failures the client makes up itself (no answer, its own deadline, a lost connection): such a call
# may never have reached the server, so it is not a call the server completed.
CLIENT_SIDE_CODES: tuple[int, ...] = (-1, 1, 4, 14)


def percentile_key(q: float) -> str:
    """50 -> ``p50``, 99.9 -> ``p99.9``."""
    return f"p{q:g}"


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0 < q <= 100) of ``values``; ``None`` when there are none."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    arr = np.sort(np.asarray(values, dtype=np.float64), kind="stable")
    return _nearest_rank(arr, q)


def percentiles(values: Sequence[float] | np.ndarray, qs: Iterable[float] = PERCENTILES) -> dict[str, Any]:
    """``{"p50": .., "p95": .., "p99": .., "p99.9": ..}`` (nearest rank; ``None`` when empty)."""
    arr = np.sort(np.asarray(values, dtype=np.float64), kind="stable")
    return {percentile_key(q): _nearest_rank(arr, q) for q in qs}


def _nearest_rank(sorted_values: np.ndarray, q: float) -> float | None:
    n = len(sorted_values)
    if n == 0:
        return None
    # round() guards against float noise such as 99.9/100*1000 = 998.9999999.
    rank = math.ceil(round(q / 100.0 * n, 9))
    return float(sorted_values[min(max(rank, 1), n) - 1])


def latency_summary_ms(latencies_s: np.ndarray) -> dict[str, Any]:
    """Seconds in, a summary in milliseconds out: count, mean, max and the standard percentiles."""
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    out: dict[str, Any] = {"count": int(ms.size)}
    out.update({k: _round(v) for k, v in percentiles(ms).items()})
    out["mean"] = _round(float(ms.mean())) if ms.size else None
    out["max"] = _round(float(ms.max())) if ms.size else None
    return out


def histogram_ms(latencies_s: np.ndarray) -> list[int]:
    """Counts per bin of :data:`HISTOGRAM_EDGES_MS`; values outside the range go to the end bins."""
    ms = np.clip(
        np.asarray(latencies_s, dtype=np.float64) * 1000.0, HISTOGRAM_EDGES_MS[0], HISTOGRAM_EDGES_MS[-1]
    )
    counts, _ = np.histogram(ms, bins=np.asarray(HISTOGRAM_EDGES_MS))
    return [int(c) for c in counts]


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class StepRecord:
    """Everything recorded for every request of one step (one entry per scheduled request).

    Times are seconds on the shared monotonic clock. ``sent`` is when the call was actually
    issued, ``done`` when its answer (or error) arrived; ``code`` is the gRPC status value;
    ``path`` indexes ``path_names`` (-1: no response).
    """

    scheduled: np.ndarray
    sent: np.ndarray
    done: np.ndarray
    code: np.ndarray
    path: np.ndarray
    degraded: np.ndarray
    path_names: list[str] = field(default_factory=list)
    error_details: dict[int, str] = field(default_factory=dict)  # status value -> first message
    # CPU seconds spent during the step by named process trees ("server", "generator"), with the
    # reading that gave each: {"server": {"seconds": 0.6, "source": "schedstat"}}. Empty: not read.
    cpu: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def merge(cls, parts: Sequence[StepRecord]) -> StepRecord:
        """One record from the records of several generator processes (path indexes remapped)."""
        if not parts:
            raise ValueError("nothing to merge")
        names: list[str] = []
        index: dict[str, int] = {}
        paths = []
        for part in parts:
            remap = np.empty(len(part.path_names) + 1, dtype=np.int16)
            remap[-1] = -1  # -1 stays -1
            for i, name in enumerate(part.path_names):
                if name not in index:
                    index[name] = len(names)
                    names.append(name)
                remap[i] = index[name]
            paths.append(remap[part.path])
        details: dict[int, str] = {}
        for part in parts:
            for value, text in part.error_details.items():
                details.setdefault(value, text)
        order = np.argsort(np.concatenate([p.scheduled for p in parts]), kind="stable")

        def cat(attr: str) -> np.ndarray:
            return np.concatenate([getattr(p, attr) for p in parts])[order]

        return cls(
            scheduled=cat("scheduled"),
            sent=cat("sent"),
            done=cat("done"),
            code=cat("code"),
            path=np.concatenate(paths)[order],
            degraded=cat("degraded"),
            path_names=names,
            error_details=details,
        )

    def latencies(self) -> np.ndarray:
        """Seconds from the intended start of each call to its answer.

        The intended start is the scheduled time, or the actual send when the generator issued
        the call a little early (its timer wakes in whole milliseconds). A late send therefore
        counts against the server, as an open-loop user would see it: this is what keeps the
        figures free of coordinated omission.
        """
        return self.done - np.minimum(self.scheduled, self.sent)


def summarize_step(
    record: StepRecord,
    *,
    offered_rate: float,
    duration_s: float,
    slo_p99_ms: float | None = None,
    max_error_rate: float | None = None,
) -> dict[str, Any]:
    """The JSON-ready figures of one step: rates, latency percentiles (successful calls and all
    calls), error mix by status name, path mix, degraded count, generator lag and a histogram."""
    n = int(record.scheduled.size)
    answered = record.done > 0
    lat = record.latencies()
    ok = answered & (record.code == 0)
    errors: dict[str, int] = {}
    for code, count in zip(*np.unique(record.code[~ok], return_counts=True), strict=True):
        errors[STATUS_NAMES.get(int(code), f"CODE_{int(code)}")] = int(count)
    paths: dict[str, int] = {}
    for idx, count in zip(*np.unique(record.path[ok], return_counts=True), strict=True):
        name = record.path_names[int(idx)] if idx >= 0 else ""
        paths[name or "(none)"] = int(count)
    sent = np.sort(record.sent[record.sent > 0])
    send_rate = (len(sent) - 1) / (sent[-1] - sent[0]) if len(sent) > 1 and sent[-1] > sent[0] else None
    lag = np.clip(record.sent - record.scheduled, 0.0, None)
    n_ok = int(ok.sum())
    # Successful calls per second over the step, stretched to the last answer: a server that
    # answers a backlog after the step ended did not sustain the offered rate.
    window = duration_s
    if n_ok:
        window = max(duration_s, float(record.done[ok].max() - record.scheduled.min()))
    n_err = n - n_ok
    summary: dict[str, Any] = {
        "offered_rate": round(offered_rate, 3),
        "duration_s": duration_s,
        "scheduled": n,
        "ok": n_ok,
        "errors_total": n_err,
        "error_rate": round(n_err / n, 6) if n else 0.0,
        "achieved_rate": round(n_ok / window, 3) if window > 0 else None,
        "send_rate": None if send_rate is None else round(float(send_rate), 3),
        "latency_ms": latency_summary_ms(lat[ok]),
        "latency_all_ms": latency_summary_ms(lat[answered]),
        "errors": errors,
        "error_details": {
            STATUS_NAMES.get(k, f"CODE_{k}"): v for k, v in sorted(record.error_details.items())
        },
        "paths": paths,
        "degraded": int((record.degraded & ok).sum()),
        "send_lag_ms": latency_summary_ms(lag),
        "histogram_ms": histogram_ms(lat[ok]),
    }
    if record.cpu:
        completed = int((answered & ~np.isin(record.code, CLIENT_SIDE_CODES)).sum())
        summary["completed"] = completed
        summary["cpu"] = {
            name: {
                "ms": round(1000.0 * reading["seconds"], 3),
                "ms_per_call": cpu_ms_per_call(reading["seconds"], completed),
                "source": reading.get("source"),
            }
            for name, reading in record.cpu.items()
        }
    if slo_p99_ms is not None and max_error_rate is not None:
        summary["slo_pass"] = step_passes(summary, slo_p99_ms, max_error_rate)
    return summary


def cpu_ms_per_call(cpu_seconds: float, completed_calls: int) -> float | None:
    """CPU milliseconds per completed call; ``None`` when no call completed."""
    if completed_calls <= 0:
        return None
    return round(1000.0 * cpu_seconds / completed_calls, 4)


def step_passes(step: dict[str, Any], slo_p99_ms: float, max_error_rate: float) -> bool:
    """True when the step met the SLO: successful p99 within the bound and few enough errors."""
    p99 = step["latency_ms"].get("p99")
    return p99 is not None and p99 <= slo_p99_ms and step["error_rate"] <= max_error_rate


def error_mix(step: dict[str, Any]) -> str:
    """``RESOURCE_EXHAUSTED 12.3%, DEADLINE_EXCEEDED 0.1%`` or ``none``."""
    n = step.get("scheduled") or 0
    if not step.get("errors") or not n:
        return "none"
    parts = sorted(step["errors"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {100.0 * count / n:.1f}%" for name, count in parts)


def path_mix(step: dict[str, Any]) -> str:
    """``light 70%, full 30%`` over successful calls, or ``-``."""
    total = sum(step.get("paths", {}).values())
    if not total:
        return "-"
    parts = sorted(step["paths"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {100.0 * count / total:.0f}%" for name, count in parts)
