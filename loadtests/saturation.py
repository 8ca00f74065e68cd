"""Saturation benchmark: the highest rate each server sustains with p99 within the SLO.

Three servers are measured in the same run, one after the other, each in its own process on a
free port: the bare echo server (the ceiling of a Python gRPC process on this machine),
``recstack serve --naive`` (the baseline) and ``recstack serve``. For each, the offered rate
steps up multiplicatively until the SLO is missed and the throughput stops following the
offered rate, then a bisection narrows the highest rate that meets the SLO. The real server then
gets a confirmation step at that rate, a step at the naive server's peak throughput and an
overload step at 1.5x its SLO rate. Every Rank request carries 100 candidates drawn from real
item ids for a real warm user, so feature reads hit keys the stream consumer wrote.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from loadtests.openloop import GeneratorConfig, GeneratorError, OpenLoopGenerator
from loadtests.servers import ServerFailed, ServerProcess, ServerSpec, echo_spec, ranking_spec
from loadtests.stats import StepRecord, summarize_step

log = logging.getLogger(__name__)

SERVER_NAMES = ("echo", "naive", "real", "real-w2")
# Measured unless --servers says otherwise; real-w2 (`serve --workers 2`, two processes on one
# port) is the scale-out comparison of docs/SCALING.md.
DEFAULT_SERVERS = ("echo", "naive", "real")
GENERATOR_LAG_LIMIT_MS = 2.0


class StepRunner(Protocol):
    def run_step(
        self, rate: float, duration_s: float, schedule: str = ..., seed: int = ...
    ) -> StepRecord: ...


@dataclass(frozen=True)
class SearchConfig:
    """How the offered rate is stepped for one server."""

    start_rate: float = 100.0
    step_factor: float = 1.5
    step_s: float = 5.0
    warmup_s: float = 2.0
    fine_steps: int = 3  # bisection steps between the last rate that met the SLO and the first that missed
    max_rate: float = 20_000.0
    max_coarse_steps: int = 14
    min_rate: float = 10.0  # when the start rate misses the SLO, step down no lower than this
    recheck_misses: bool = True  # measure an SLO miss (below saturation) once more before believing it
    saturation_fraction: float = 0.9  # saturated: successful calls fall below this share of the offered rate
    cooldown_s: float = 0.5  # pause between steps so one step's backlog does not leak into the next
    slo_p99_ms: float = 10.0
    max_error_rate: float = 0.01
    schedule: str = "poisson"


QUICK_SEARCH = SearchConfig(
    start_rate=200.0,
    step_factor=2.0,
    step_s=1.5,
    warmup_s=0.5,
    fine_steps=1,
    max_coarse_steps=5,
    min_rate=50.0,
    cooldown_s=0.3,
)


@dataclass(frozen=True)
class BenchConfig:
    out: Path
    servers: tuple[str, ...] = DEFAULT_SERVERS
    models: str = "artifacts/models"
    redis: str = "redis://127.0.0.1:6379/0"
    serve_args: tuple[str, ...] = ()
    candidates: int = 100
    source: str = "onlineretail"
    request_pool: int = 2_000
    overload_factor: float = 1.5
    start_timeout_s: float = 180.0
    seed: int = 0
    quick: bool = False
    search: SearchConfig = field(default_factory=SearchConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


# --- stepping ------------------------------------------------------------------------------------


def measure(runner: StepRunner, rate: float, phase: str, search: SearchConfig, seed: int) -> dict[str, Any]:
    """One step at ``rate``: the summary of :func:`loadtests.stats.summarize_step` plus its phase."""
    record = runner.run_step(rate, search.step_s, search.schedule, seed)
    step = summarize_step(
        record,
        offered_rate=rate,
        duration_s=search.step_s,
        slo_p99_ms=search.slo_p99_ms,
        max_error_rate=search.max_error_rate,
    )
    step["phase"] = phase
    step["saturated"] = is_saturated(step, search)
    # The generator shares the machine: when its own sends ran late, a miss may be the machine's.
    step["generator_limited"] = (step["send_lag_ms"].get("p99") or 0.0) > GENERATOR_LAG_LIMIT_MS
    lat = step["latency_ms"]
    log.info(
        "%-9s %8.1f/s offered  %8.1f/s ok  p50 %s  p99 %s ms  errors %.2f%%  %s",
        phase,
        rate,
        step["achieved_rate"] or 0.0,
        _fmt(lat["p50"]),
        _fmt(lat["p99"]),
        100 * step["error_rate"],
        "meets SLO" if step["slo_pass"] else "misses SLO",
    )
    if search.cooldown_s:
        time.sleep(search.cooldown_s * (1 if step["slo_pass"] else 2))
    return step


def _tail_only_miss(step: dict[str, Any], search: SearchConfig) -> bool:
    """A miss with a healthy median and few errors: a stall may explain it, a queue would not."""
    p50 = step["latency_ms"].get("p50")
    return (
        not step["saturated"]
        and p50 is not None
        and p50 <= search.slo_p99_ms
        and step["error_rate"] <= search.max_error_rate
    )


def is_saturated(step: dict[str, Any], search: SearchConfig) -> bool:
    achieved = step.get("achieved_rate") or 0.0
    return achieved < search.saturation_fraction * step["offered_rate"]


def search_rates(runner: StepRunner, search: SearchConfig, seed: int = 0) -> dict[str, Any]:
    """Step the rate up to saturation, then bisect for the highest rate that meets the SLO.

    Returns ``steps`` (every measured step, in order), ``slo_rate`` (the highest offered rate
    measured to meet the SLO, ``None`` if none did) and ``peak_rate`` (the highest rate of
    successful calls seen in any step: the saturation throughput).
    """
    steps: list[dict[str, Any]] = []

    def step(rate: float, phase: str) -> dict[str, Any]:
        result = measure(runner, rate, phase, search, seed + len(steps))
        steps.append(result)
        if search.recheck_misses and not result["slo_pass"] and _tail_only_miss(result, search):
            # On a shared machine one stall can spoil a step's tail: such a miss is measured
            # again, and the second measurement decides.
            result["superseded"] = True
            result = measure(runner, rate, phase + "-recheck", search, seed + len(steps) + 50_000)
            steps.append(result)
        return result

    def measure_once(rate: float, phase: str) -> dict[str, Any]:
        result = measure(runner, rate, phase, search, seed + len(steps))
        steps.append(result)
        return result

    if search.warmup_s > 0:  # connections, caches and JIT-like warm paths; not recorded
        runner.run_step(min(search.start_rate, 100.0), search.warmup_s, search.schedule, seed + 10_000)

    last_pass: float | None = None
    first_miss: float | None = None
    rate = search.start_rate
    # Past the first SLO miss the rate keeps rising until the throughput stops following it:
    # that peak is the saturation throughput the naive comparison is stated in.
    for _ in range(search.max_coarse_steps):
        result = step(rate, "coarse")
        if result["slo_pass"] and first_miss is None:
            last_pass = rate
        elif not result["slo_pass"] and first_miss is None:
            first_miss = rate
        if result["saturated"]:
            break
        rate *= search.step_factor
        if rate > search.max_rate:
            break

    if last_pass is None and first_miss is not None:  # even the start rate missed: step down
        rate = first_miss / search.step_factor
        while rate >= search.min_rate:
            if measure_once(rate, "descend")["slo_pass"]:
                last_pass = rate
                break
            first_miss = rate
            rate /= search.step_factor

    if last_pass is not None and first_miss is not None:
        low, high = last_pass, first_miss
        for _ in range(search.fine_steps):
            mid = (low + high) / 2.0
            if step(mid, "fine")["slo_pass"]:
                low = mid
            else:
                high = mid
        last_pass = low

    peak = max((s["achieved_rate"] or 0.0 for s in steps), default=0.0)
    return {
        "steps": steps,
        "slo_rate": None if last_pass is None else round(last_pass, 3),
        # True when no step missed the SLO: the server may sustain more than was offered.
        "slo_rate_is_lower_bound": first_miss is None,
        "peak_rate": round(peak, 3),
    }


# --- one server ----------------------------------------------------------------------------------


def bench_server(
    spec: ServerSpec,
    cfg: BenchConfig,
    requests: list[bytes],
    extra_steps: Callable[[StepRunner, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Start ``spec``, search its rates, run ``extra_steps`` on it, stop it. Failures are recorded."""
    result: dict[str, Any] = {"name": spec.name, "status": "ok", "error": None}
    server = ServerProcess(spec, cfg.out / f"server-{spec.name}.log")
    result["argv"] = server.argv
    log.info("starting the %s server: %s", spec.name, " ".join(server.argv))
    try:
        result["startup_s"] = round(server.start(cfg.start_timeout_s), 2)
        with OpenLoopGenerator(server.address, "Rank", requests, cfg.generator) as generator:
            result.update(search_rates(generator, cfg.search, cfg.seed))
            if extra_steps is not None:
                extra_steps(generator, result)
                # Any step may show the highest throughput, the overload step included.
                extra = [result[k] for k in ("target", "at_naive_peak", "overload") if result.get(k)]
                result["peak_rate"] = max([result["peak_rate"], *(s["achieved_rate"] or 0.0 for s in extra)])
    except (ServerFailed, GeneratorError) as exc:
        log.error("%s server: %s", spec.name, exc)
        result.update(status="failed", error=str(exc))
    finally:
        result["exit_code"] = server.stop()
    return result


def real_server_steps(
    cfg: BenchConfig, naive_peak: float | None
) -> Callable[[StepRunner, dict[str, Any]], None]:
    """The real server's extra steps: confirmation at its SLO rate, the naive server's peak rate,
    and the overload step at ``overload_factor`` times its SLO rate (its peak when it never met it)."""

    def run(runner: StepRunner, result: dict[str, Any]) -> None:
        seed = cfg.seed + 1_000
        if result["slo_rate"]:
            result["target"] = measure(runner, result["slo_rate"], "target", cfg.search, seed)
        if naive_peak:
            result["at_naive_peak"] = measure(runner, naive_peak, "naive-peak", cfg.search, seed + 1)
        basis = result["slo_rate"] or result["peak_rate"]
        if basis:
            result["overload_basis"] = "slo_rate" if result["slo_rate"] else "peak_rate"
            result["overload_basis_rate"] = basis
            result["overload"] = measure(
                runner, cfg.overload_factor * basis, "overload", cfg.search, seed + 2
            )

    return run


# --- the whole run -------------------------------------------------------------------------------


def server_specs(cfg: BenchConfig) -> dict[str, ServerSpec]:
    specs = {
        "echo": echo_spec(),
        "naive": ranking_spec("naive", cfg.models, cfg.redis, naive=True, extra_args=cfg.serve_args),
        "real": ranking_spec("real", cfg.models, cfg.redis, naive=False, extra_args=cfg.serve_args),
        "real-w2": ranking_spec(
            "real-w2", cfg.models, cfg.redis, naive=False, extra_args=(*cfg.serve_args, "--workers", "2")
        ),
    }
    return {name: specs[name] for name in SERVER_NAMES if name in cfg.servers}


def run_bench(
    cfg: BenchConfig, requests: list[bytes] | None = None, specs: dict[str, ServerSpec] | None = None
) -> dict[str, Any]:
    """Measure every selected server (``specs``: how to start each; the built-in ones by default),
    write ``results.json``, ``summary.md`` and the plots."""
    from loadtests import report, workload

    cfg.out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    if requests is None:
        log.info("loading users and items from %s", cfg.source)
        requests = workload.rank_requests(
            workload.load(cfg.source), cfg.request_pool, cfg.candidates, cfg.seed
        )
    results: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "config": _config_dict(cfg),
        "machine": machine_info(),
        "slo_p99_ms": cfg.search.slo_p99_ms,
        "servers": {},
    }
    for name, spec in (specs or server_specs(cfg)).items():
        extra = None
        if name == "real":
            naive = results["servers"].get("naive", {})
            extra = real_server_steps(cfg, naive.get("peak_rate") if naive.get("status") == "ok" else None)
        results["servers"][name] = bench_server(spec, cfg, requests, extra)
    results["comparison"] = compare(results)
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["machine"]["load_average_end"] = _load_average()
    write_results(results, cfg.out)
    report.write_summary(results, cfg.out / "summary.md")
    report.write_plots(results, cfg.out)
    return results


def compare(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios the targets are stated in, from servers measured in this run."""
    servers = results["servers"]

    def figure(name: str, key: str) -> float | None:
        server = servers.get(name) or {}
        return server.get(key) if server.get("status") == "ok" else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    real_slo, echo_slo = figure("real", "slo_rate"), figure("echo", "slo_rate")
    real_peak, naive_peak = figure("real", "peak_rate"), figure("naive", "peak_rate")
    out = {
        "real_over_echo_slo_rate": ratio(real_slo, echo_slo),
        "real_over_echo_target": 0.6,
        "real_over_naive_peak": ratio(real_peak, naive_peak),
        "real_over_naive_target": 5.0,
    }
    if "real-w2" in servers:
        w2_slo, w2_peak = figure("real-w2", "slo_rate"), figure("real-w2", "peak_rate")
        out["real_w2_over_real_slo_rate"] = ratio(w2_slo, real_slo)
        out["real_w2_over_real_peak"] = ratio(w2_peak, real_peak)
        out["real_w2_over_echo_slo_rate"] = ratio(w2_slo, echo_slo)
    return out


def write_results(results: dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import grpc

    return {
        "cpu": model or platform.processor(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "load_average_start": _load_average(),
    }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _config_dict(cfg: BenchConfig) -> dict[str, Any]:
    data = asdict(replace(cfg, out=Path(cfg.out)))
    data["out"] = str(cfg.out)
    return data


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
