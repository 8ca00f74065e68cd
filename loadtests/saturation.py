"""Saturation benchmark: the highest rate each server sustains with p99 within the SLO, and the
CPU time each call costs it.

Three servers are measured in the same run, one after the other, each in its own process on a
free port: the bare echo server (the ceiling of a Python gRPC process on this machine),
``recstack serve --naive`` (the baseline) and ``recstack serve``. For each, the offered rate goes
through fixed steps (25, 50, 100 and 200/s, then x1.5 upward) until the throughput stops following
it; a bisection then narrows the highest rate within the SLO. A server's SLO rate counts only
if every fixed step up to it met the SLO: a miss at 25/s means it has none. The real server then
gets a confirmation step at that rate, a step at the naive server's peak throughput and an
overload step at 1.5x its SLO rate. At every step the server's and the load generator's CPU time
are read from /proc (:mod:`loadtests.cpu`) and divided by the calls the step completed.

Every Rank request carries 100 candidates drawn from real item ids for a returning shopper, a
user with at least 20 recent items in the feature store (:mod:`loadtests.shoppers`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from loadtests.cpu import CpuMeter, available
from loadtests.openloop import GeneratorConfig, GeneratorError, OpenLoopGenerator
from loadtests.servers import ServerFailed, ServerProcess, ServerSpec, echo_spec, ranking_spec
from loadtests.stats import StepRecord, summarize_step

log = logging.getLogger(__name__)

SERVER_NAMES = ("echo", "naive", "real", "real-w2")
# Measured unless --servers says otherwise; real-w2 (`serve --workers 2`, two processes on one
# port) is the scale-out comparison of docs/SCALING.md.
DEFAULT_SERVERS = ("echo", "naive", "real")
GENERATOR_LAG_LIMIT_MS = 2.0
# Offered rates at which real/echo CPU per call is compared, with the highest ratio allowed.
CPU_TARGETS: dict[float, float] = {25.0: 2.0, 200.0: 1.6}


class StepRunner(Protocol):
    def run_step(
        self, rate: float, duration_s: float, schedule: str = ..., seed: int = ...
    ) -> StepRecord: ...


@dataclass(frozen=True)
class SearchConfig:
    """How the offered rate is stepped for one server."""

    # The fixed steps: these rates in order, then each step_factor times the one before. The low
    # rates are where a lone call finds everything cold, so they count towards the SLO rate.
    rates: tuple[float, ...] = (25.0, 50.0, 100.0, 200.0)
    step_factor: float = 1.5
    step_s: float = 5.0  # a step lasts this long, or longer when min_calls needs it
    min_calls: int = 500  # calls per step at least (25/s: 20 s), so that a p99 means something
    warmup_s: float = 2.0
    idle_s: float = 3.0  # the server's CPU while idle is read over this long, after the search
    fine_steps: int = 3  # bisection steps between the SLO rate and the first fixed step that missed
    max_rate: float = 20_000.0
    max_fixed_steps: int = 16
    recheck_misses: bool = True  # measure an SLO miss (below saturation) once more before believing it
    saturation_fraction: float = 0.9  # saturated: successful calls fall below this share of the offered rate
    cooldown_s: float = 0.5  # pause between steps so one step's backlog does not leak into the next
    slo_p99_ms: float = 10.0
    # Also reported: whether p99 stayed within tight_p99_ms at every fixed step up to tight_up_to.
    tight_p99_ms: float = 5.0
    tight_up_to: float = 200.0
    max_error_rate: float = 0.01
    schedule: str = "poisson"

    def __post_init__(self) -> None:
        if not self.rates or any(r <= 0 for r in self.rates):
            raise ValueError(f"rates must be positive calls/s, got {self.rates}")
        if any(b <= a for a, b in zip(self.rates, self.rates[1:], strict=False)):
            raise ValueError(f"rates must increase, got {self.rates}")
        if self.step_factor <= 1:
            raise ValueError(f"step factor must be greater than 1, got {self.step_factor}")
        if self.min_calls < 1:
            raise ValueError(f"min calls must be at least 1, got {self.min_calls}")

    def duration(self, rate: float) -> float:
        """Seconds a step at ``rate`` lasts: ``step_s``, or long enough for ``min_calls`` calls."""
        return max(self.step_s, self.min_calls / rate)

    def fixed_rates(self) -> Iterator[float]:
        """The fixed steps' rates, up to ``max_rate`` and ``max_fixed_steps``."""
        rate = 0.0
        for i in range(self.max_fixed_steps):
            rate = self.rates[i] if i < len(self.rates) else rate * self.step_factor
            if rate > self.max_rate:
                return
            yield rate


# make demo's quick run: the same fixed low rates, far fewer calls. Its figures are indicative.
QUICK_SEARCH = SearchConfig(
    step_factor=2.0,
    step_s=1.5,
    min_calls=100,
    warmup_s=0.5,
    idle_s=1.0,
    fine_steps=1,
    max_fixed_steps=9,
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
    min_recent_items: int = 20  # Rank requests name users with this many recent items; 0: any user
    min_users: int = 50  # fewer such users in Redis and the run stops before it starts
    overload_factor: float = 1.5
    start_timeout_s: float = 180.0
    seed: int = 0
    quick: bool = False
    search: SearchConfig = field(default_factory=SearchConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    # What experiments cost (loadtests/experiment_bench.py); both off: the run is the plain one.
    experiments: bool = False  # interleaved rounds: no experiment, A/B, A/B + shadow
    experiment_ladder: bool = False  # the real server's ladder again with the A/B experiment on
    kafka_bootstrap: str = ""
    impressions_topic: str = "rank-impressions"
    experiment_versions: tuple[str, ...] = ()  # A, B[, shadow]; empty: copies of the served version
    experiment_rounds: int = 2
    experiment_min_calls: int = 500
    experiment_rate_fraction: float = 0.5
    experiment_rate: float = 0.0  # > 0: the rounds' rate, instead of the fraction of the SLO rate


# --- stepping ------------------------------------------------------------------------------------


class MeteredRunner:
    """A step runner that also reads the CPU time of named process trees around every step
    (``server`` and ``generator``): each record's ``cpu`` holds the seconds each spent."""

    def __init__(self, runner: StepRunner, meters: Mapping[str, CpuMeter]) -> None:
        self.runner = runner
        self.meters = dict(meters)

    def run_step(
        self, rate: float, duration_s: float, schedule: str = "poisson", seed: int = 0
    ) -> StepRecord:
        before = {name: meter.snapshot() for name, meter in self.meters.items()}
        record = self.runner.run_step(rate, duration_s, schedule, seed)
        for name, meter in self.meters.items():
            delta = meter.since(before[name])
            record.cpu[name] = {"seconds": delta.seconds, "source": delta.source}
        return record

    def idle(self, seconds: float) -> dict[str, float]:
        """CPU ms per second each tree spends while no call is offered."""
        before = {name: meter.snapshot() for name, meter in self.meters.items()}
        began = time.monotonic()
        time.sleep(seconds)
        took = time.monotonic() - began
        return {
            f"{name}_ms_per_s": round(1000.0 * meter.since(before[name]).seconds / took, 3)
            for name, meter in self.meters.items()
        }


def measure(runner: StepRunner, rate: float, phase: str, search: SearchConfig, seed: int) -> dict[str, Any]:
    """One step at ``rate``: the summary of :func:`loadtests.stats.summarize_step` plus its phase."""
    duration_s = search.duration(rate)
    record = runner.run_step(rate, duration_s, search.schedule, seed)
    step = summarize_step(
        record,
        offered_rate=rate,
        duration_s=duration_s,
        slo_p99_ms=search.slo_p99_ms,
        max_error_rate=search.max_error_rate,
    )
    step["phase"] = phase
    step["saturated"] = is_saturated(step, search)
    # The generator shares the machine: when its own sends ran late, a miss may be the machine's.
    step["generator_limited"] = (step["send_lag_ms"].get("p99") or 0.0) > GENERATOR_LAG_LIMIT_MS
    lat = step["latency_ms"]
    cpu = step.get("cpu", {})
    log.info(
        "%-9s %8.1f/s offered  %8.1f/s ok  p50 %s  p99 %s ms  errors %.2f%%  cpu/call %s (gen %s) ms  %s",
        phase,
        rate,
        step["achieved_rate"] or 0.0,
        _fmt(lat["p50"]),
        _fmt(lat["p99"]),
        100 * step["error_rate"],
        _fmt(cpu.get("server", {}).get("ms_per_call")),
        _fmt(cpu.get("generator", {}).get("ms_per_call")),
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


def counted(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps that decide: a step measured again is replaced by its recheck."""
    return [s for s in steps if not s.get("superseded")]


def fixed_steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The deciding measurement of every fixed step, by rate."""
    return sorted((s for s in counted(steps) if s.get("fixed")), key=lambda s: s["offered_rate"])


def slo_rate_of(steps: list[dict[str, Any]]) -> float | None:
    """The highest offered rate that met the SLO with every fixed step up to it meeting it too.

    The fixed steps are read from the lowest rate up and stop counting at the first miss: a miss
    at the lowest fixed rate means no SLO rate, whatever the higher steps did. A bisection step
    below that first miss may raise the figure; one above it never does.
    """
    fixed = fixed_steps(steps)
    if not fixed or not fixed[0]["slo_pass"]:
        return None
    first_miss = next((s["offered_rate"] for s in fixed if not s["slo_pass"]), None)
    met = [
        s["offered_rate"]
        for s in counted(steps)
        if s["slo_pass"]
        and (s.get("fixed") or s.get("phase", "").startswith("fine"))
        and (first_miss is None or s["offered_rate"] < first_miss)
    ]
    return max(met)


def tight_p99(steps: list[dict[str, Any]], search: SearchConfig) -> dict[str, Any]:
    """Whether p99 stayed within ``tight_p99_ms`` at every fixed step up to ``tight_up_to``.

    ``held`` is ``None`` when none of those steps was measured, and ``False`` when one of the
    schedule's rates in that range was never reached (the server saturated below it)."""
    wanted = [r for r in search.fixed_rates() if r <= search.tight_up_to]
    in_range = [s for s in fixed_steps(steps) if s["offered_rate"] <= search.tight_up_to]
    out: dict[str, Any] = {"p99_ms": search.tight_p99_ms, "up_to": search.tight_up_to, "held": None}
    if not in_range:
        return out
    worst = max(in_range, key=lambda s: s["latency_ms"].get("p99") or float("inf"))
    p99s = [s["latency_ms"].get("p99") for s in in_range]
    measured = {s["offered_rate"] for s in in_range}
    out["held"] = all(p is not None and p <= search.tight_p99_ms for p in p99s) and all(
        r in measured for r in wanted
    )
    out["worst_p99_ms"] = worst["latency_ms"].get("p99")
    out["worst_at"] = worst["offered_rate"]
    return out


def search_rates(runner: StepRunner, search: SearchConfig, seed: int = 0) -> dict[str, Any]:
    """Run the fixed steps up to saturation, then bisect above the SLO rate.

    Returns ``steps`` (every measured step, in order; fixed ones carry ``fixed: True``),
    ``slo_rate`` (:func:`slo_rate_of`), ``slo_rate_is_lower_bound`` (no fixed step missed),
    ``peak_rate`` (the highest rate of successful calls in any step: the saturation throughput)
    and ``tight_p99`` (:func:`tight_p99`).
    """
    steps: list[dict[str, Any]] = []

    def step(rate: float, phase: str, fixed: bool) -> dict[str, Any]:
        result = measure(runner, rate, phase, search, seed + len(steps))
        result["fixed"] = fixed
        steps.append(result)
        if search.recheck_misses and not result["slo_pass"] and _tail_only_miss(result, search):
            # On a shared machine one stall can spoil a step's tail: such a miss is measured
            # again, and the second measurement decides.
            result["superseded"] = True
            result = measure(runner, rate, phase + "-recheck", search, seed + len(steps) + 50_000)
            result["fixed"] = fixed
            steps.append(result)
        return result

    if search.warmup_s > 0:  # connections, caches and JIT-like warm paths; not recorded
        runner.run_step(min(search.rates[0], 100.0), search.warmup_s, search.schedule, seed + 10_000)

    first_miss: float | None = None
    # Past the first SLO miss the rate keeps rising until the throughput stops following it:
    # that peak is the saturation throughput the naive comparison is stated in.
    for rate in search.fixed_rates():
        result = step(rate, "fixed", True)
        if not result["slo_pass"] and first_miss is None:
            first_miss = rate
        if result["saturated"]:
            break

    low = slo_rate_of(steps)
    if low is not None and first_miss is not None:
        high = first_miss
        for _ in range(search.fine_steps):
            mid = (low + high) / 2.0
            if step(mid, "fine", False)["slo_pass"]:
                low = mid
            else:
                high = mid

    slo_rate = slo_rate_of(steps)
    peak = max((s["achieved_rate"] or 0.0 for s in steps), default=0.0)
    return {
        "steps": steps,
        "slo_rate": None if slo_rate is None else round(slo_rate, 3),
        # True when no fixed step missed the SLO: the server may sustain more than was offered.
        "slo_rate_is_lower_bound": first_miss is None,
        "peak_rate": round(peak, 3),
        "tight_p99": tight_p99(steps, search),
    }


# --- one server ----------------------------------------------------------------------------------


def bench_server(
    spec: ServerSpec,
    cfg: BenchConfig,
    requests: list[bytes],
    extra_steps: Callable[[StepRunner, dict[str, Any]], None] | None = None,
    on_start: Callable[[ServerProcess], None] | None = None,
) -> dict[str, Any]:
    """Start ``spec``, search its rates, run ``extra_steps`` on it, stop it. Failures are recorded.
    ``on_start`` runs once the server is healthy, before any step (it may wait for the server).

    Every step also reads the CPU time of the server's process tree and of the generator's
    processes (where /proc exists), and the server's CPU while idle is read after the search."""
    result: dict[str, Any] = {"name": spec.name, "status": "ok", "error": None}
    server = ServerProcess(spec, cfg.out / f"server-{spec.name}.log")
    result["argv"] = server.argv
    log.info("starting the %s server: %s", spec.name, " ".join(server.argv))
    try:
        result["startup_s"] = round(server.start(cfg.start_timeout_s), 2)
        if on_start is not None:
            on_start(server)
        with OpenLoopGenerator(server.address, "Rank", requests, cfg.generator) as generator:
            runner: StepRunner = generator
            metered = None
            if available() and server.pid is not None:
                meters = {"server": CpuMeter([server.pid]), "generator": CpuMeter(generator.pids)}
                runner = metered = MeteredRunner(generator, meters)
            result.update(search_rates(runner, cfg.search, cfg.seed))
            if metered is not None and cfg.search.idle_s > 0:
                result["idle_cpu"] = metered.idle(cfg.search.idle_s)
            if extra_steps is not None:
                extra_steps(runner, result)
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
    write ``results.json``, ``summary.md`` and the plots.

    Without ``requests``, they are made for the returning shoppers in ``cfg.redis``
    (:func:`loadtests.shoppers.read_returning`): a :class:`recstack.errors.UserError` says how to
    stream features in when there are too few, before any server starts."""
    from loadtests import report

    cfg.out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    shoppers = None
    if requests is None:
        requests, shoppers = prepare_requests(cfg)
    results: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "config": _config_dict(cfg),
        "machine": machine_info(),
        "slo_p99_ms": cfg.search.slo_p99_ms,
        "shoppers": shoppers,
        "servers": {},
    }
    for name, spec in (specs or server_specs(cfg)).items():
        extra = None
        if name == "real":
            naive = results["servers"].get("naive", {})
            extra = real_server_steps(cfg, naive.get("peak_rate") if naive.get("status") == "ok" else None)
        results["servers"][name] = bench_server(spec, cfg, requests, extra)
    if cfg.experiments or cfg.experiment_ladder:
        from loadtests import experiment_bench

        experiment_bench.run(cfg, requests, results)
    results["comparison"] = compare(results)
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["machine"]["load_average_end"] = _load_average()
    write_results(results, cfg.out)
    report.write_summary(results, cfg.out / "summary.md")
    report.write_plots(results, cfg.out)
    return results


def prepare_requests(cfg: BenchConfig) -> tuple[list[bytes], dict[str, Any]]:
    """The serialized Rank requests and a summary of the users they name: the source's warm users,
    kept only when they have ``cfg.min_recent_items`` recent items in Redis (unless that is 0)."""
    from loadtests import shoppers, workload

    log.info("loading users and items from %s", cfg.source)
    mix = workload.load(cfg.source)
    summary: dict[str, Any] = {"users": len(mix.users), "min_recent_items": 0, "checked_in_redis": False}
    if cfg.min_recent_items > 0:
        from recstack import redis_url

        client = redis_url.connect(cfg.redis, socket_timeout=10.0)
        try:
            chosen = shoppers.read_returning(
                client, mix.users, cfg.min_recent_items, min_users=cfg.min_users, where=cfg.redis
            )
        finally:
            client.close()
        log.info(
            "%d of %d users are returning shoppers (>= %d recent items; median %s)",
            len(chosen.users),
            chosen.checked,
            cfg.min_recent_items,
            chosen.median_recent_items,
        )
        mix = replace(mix, users=chosen.users)
        summary = {**chosen.summary(), "checked_in_redis": True}
    requests = workload.rank_requests(mix, cfg.request_pool, cfg.candidates, cfg.seed)
    return requests, summary


def compare(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios the targets are stated in, from servers measured in this run."""
    servers = results["servers"]

    def figure(name: str, key: str) -> Any:
        server = servers.get(name) or {}
        return server.get(key) if server.get("status") == "ok" else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    real_slo, echo_slo = figure("real", "slo_rate"), figure("echo", "slo_rate")
    real_peak, naive_peak = figure("real", "peak_rate"), figure("naive", "peak_rate")
    out: dict[str, Any] = {
        "real_over_echo_slo_rate": ratio(real_slo, echo_slo),
        "real_over_echo_target": 0.6,
        "real_over_naive_peak": ratio(real_peak, naive_peak),
        "real_over_naive_target": 5.0,
        "slo_rate": {name: figure(name, "slo_rate") for name in servers},
        "tight_p99_held": {name: (figure(name, "tight_p99") or {}).get("held") for name in servers},
    }
    # CPU per call at the fixed rates the targets name, every server, and real over echo.
    cpu: dict[str, dict[str, float | None]] = {}
    for name in servers:
        steps = {s["offered_rate"]: s for s in fixed_steps(figure(name, "steps") or [])}
        cpu[name] = {
            f"{rate:g}": (steps.get(rate, {}).get("cpu", {}).get("server") or {}).get("ms_per_call")
            for rate in CPU_TARGETS
        }
    out["cpu_ms_per_call"] = cpu
    for rate, target in CPU_TARGETS.items():
        key = f"{rate:g}"
        value = ratio(cpu.get("real", {}).get(key), cpu.get("echo", {}).get(key))
        out[f"real_over_echo_cpu_at_{key}"] = value
        out[f"real_over_echo_cpu_at_{key}_target"] = target
        out[f"real_over_echo_cpu_at_{key}_met"] = None if value is None else value <= target
    overload = figure("real", "overload")
    if overload:
        out["overload_p99_ms"] = overload["latency_ms"].get("p99")
        out["overload_errors"] = overload.get("errors", {})
        out["overload_only_resource_exhausted"] = set(overload.get("errors", {})) <= {"RESOURCE_EXHAUSTED"}
    if "real-ab" in servers:  # the serving targets, read again with the A/B experiment on
        ab_slo, ab_peak = figure("real-ab", "slo_rate"), figure("real-ab", "peak_rate")
        out["real_ab_over_real_slo_rate"] = ratio(ab_slo, real_slo)
        out["real_ab_over_echo_slo_rate"] = ratio(ab_slo, echo_slo)
        out["real_ab_over_naive_peak"] = ratio(ab_peak, naive_peak)
        for rate, target in CPU_TARGETS.items():
            key = f"{rate:g}"
            value = ratio(cpu.get("real-ab", {}).get(key), cpu.get("echo", {}).get(key))
            out[f"real_ab_over_echo_cpu_at_{key}"] = value
            out[f"real_ab_over_echo_cpu_at_{key}_met"] = None if value is None else value <= target
        ab_overload = figure("real-ab", "overload")
        if ab_overload:
            out["real_ab_overload_only_resource_exhausted"] = set(ab_overload.get("errors", {})) <= {
                "RESOURCE_EXHAUSTED"
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
