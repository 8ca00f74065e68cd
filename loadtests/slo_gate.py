"""SLO gate: offer a fixed rate to a running server and fail when p99 or errors exceed the bounds.

Meant for CI and release checks: one open-loop step (after a short warm-up) against a server
that is already up, figures printed, exit status 0 when the SLO held and 1 when it did not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loadtests.openloop import GeneratorConfig, OpenLoopGenerator
from loadtests.stats import error_mix, path_mix, summarize_step


@dataclass(frozen=True)
class Gate:
    target: str
    rate: float
    duration_s: float
    p99_ms: float = 10.0
    max_error_rate: float = 0.01
    warmup_s: float = 1.0
    method: str = "Rank"
    schedule: str = "poisson"
    seed: int = 0


def run_gate(gate: Gate, requests: list[bytes], generator: GeneratorConfig | None = None) -> dict[str, Any]:
    """Run the gate's step; the step summary with ``passed`` and ``reasons`` (why it failed)."""
    with OpenLoopGenerator(gate.target, gate.method, requests, generator) as load:
        if gate.warmup_s > 0:
            load.run_step(min(gate.rate, 100.0), gate.warmup_s, gate.schedule, gate.seed + 1)
        record = load.run_step(gate.rate, gate.duration_s, gate.schedule, gate.seed)
    step = summarize_step(
        record,
        offered_rate=gate.rate,
        duration_s=gate.duration_s,
        slo_p99_ms=gate.p99_ms,
        max_error_rate=gate.max_error_rate,
    )
    reasons = []
    p99 = step["latency_ms"]["p99"]
    if p99 is None:
        reasons.append("no successful call")
    elif p99 > gate.p99_ms:
        reasons.append(f"p99 {p99:.2f} ms > {gate.p99_ms:g} ms")
    if step["error_rate"] > gate.max_error_rate:
        reasons.append(
            f"errors {100 * step['error_rate']:.2f}% > {100 * gate.max_error_rate:g}% ({error_mix(step)})"
        )
    step["passed"] = not reasons
    step["reasons"] = reasons
    return step


def format_gate(gate: Gate, step: dict[str, Any]) -> str:
    lat = step["latency_ms"]
    figures = "  ".join(
        f"{k} {lat[k]:.2f}" if lat[k] is not None else f"{k} -" for k in ("p50", "p95", "p99", "p99.9")
    )
    lines = [
        f"slo-gate: {gate.method} at {gate.rate:g}/s for {gate.duration_s:g} s against {gate.target} "
        f"({gate.schedule} arrivals, open loop)",
        f"  latency ms   {figures}  (successful calls, from scheduled send)",
        f"  throughput   {step['achieved_rate']:.1f}/s ok of {step['offered_rate']:.1f}/s offered "
        f"({step['ok']} ok, {step['errors_total']} errors)",
        f"  errors       {error_mix(step)}",
        f"  paths        {path_mix(step)}; degraded {step['degraded']}",
        f"  generator    send lag p99 {step['send_lag_ms']['p99'] or 0:.2f} ms",
    ]
    lag = step["send_lag_ms"]["p99"] or 0.0
    if lag > 2.0:
        lines.append(
            f"  warning      the generator itself ran late (send lag p99 {lag:.1f} ms): the machine is busy "
            "and the latencies above include that delay"
        )
    verdict = "PASS" if step["passed"] else "FAIL: " + "; ".join(step["reasons"])
    lines.append(f"  SLO p99 <= {gate.p99_ms:g} ms, errors <= {100 * gate.max_error_rate:g}%: {verdict}")
    return "\n".join(lines)
