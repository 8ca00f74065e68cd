"""What experiments cost the real server, measured inside ``recstack bench`` (docs/LOADTESTS.md).

``--experiments``: once the ladder has found the real server's SLO rate, one more real server
(impressions on: ``--kafka-bootstrap``; ``/metrics`` on a free port) takes interleaved rounds at
``--experiment-rate-fraction`` (0.5) of that rate under three experiment states, switched in the
bench's Redis between rounds on the same process:

* ``none``: no experiment (impressions still published);
* ``ab``: an A/B experiment, two versions 50/50;
* ``shadow``: the same plus a shadow arm.

Rounds go ``none ab shadow``, then ``shadow ab none``, and so on (:func:`round_plan`): a drift of
the machine's load over the run weighs on every state alike. Each round has at least
``--experiment-min-calls`` calls; a state's p99 is taken over all its rounds' calls together, its
CPU per call over all their CPU seconds and completed calls. The server's shadow and impression
counters are read from its ``/metrics`` around every round.

``--experiment-ladder``: the real server's whole ladder again with the A/B experiment on
(``real-ab`` in the report), so the serving targets can be read for it beside the plain one.

Without ``--experiment-versions`` the versions are copies of the models folder's served version
in a private folder of the output (``experiment-models``; its ``DEFAULT`` names the original):
A serves the original, B and the shadow serve copies, so every arm is a model of its own in
memory, as a real experiment's would be.
"""

from __future__ import annotations

import logging
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests.servers import ServerProcess, ServerSpec, free_port, serve_command
from loadtests.stats import StepRecord, summarize_step

log = logging.getLogger(__name__)

STATES = ("none", "ab", "shadow")
EXPERIMENT_NAME = "recstack-bench"
# The targets for the shadow arm, against no experiment in the same run.
SHADOW_P99_TARGET_MS = 1.0
SHADOW_CPU_TARGET = 0.10
WAIT_S = 60.0


class ExperimentBenchError(RuntimeError):
    """The experiment rounds cannot run (a running experiment, a missing version, no server)."""


def round_plan(states: tuple[str, ...], rounds: int) -> list[tuple[int, str]]:
    """(round, state) in the order they run: every state once per round, the order reversed every
    other round (ABC CBA ...), so a steady drift of the machine's load favours none of them."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    plan = []
    for r in range(rounds):
        order = states if r % 2 == 0 else tuple(reversed(states))
        plan += [(r, s) for s in order]
    return plan


# --- versions ------------------------------------------------------------------------------------


def prepare_versions(models: str | Path, out: Path, given: tuple[str, ...]) -> tuple[Path, dict[str, str]]:
    """The models folder the experiment servers use and the versions of arms A, B and the shadow C.

    ``given`` (``--experiment-versions``): two or three versions of ``models`` (the shadow is the
    third, else B's). Otherwise the served version of ``models`` is copied twice into
    ``out/experiment-models`` (whose ``DEFAULT`` keeps the original the default)."""
    from models.artifacts import list_versions, read_default, write_default

    root = Path(models)
    listed = list_versions(root)  # oldest first
    names = {p.name for p in listed}
    if given:
        if len(given) not in (2, 3):
            raise ExperimentBenchError(
                f"--experiment-versions: name two versions (A,B) or three (A,B,SHADOW), got {len(given)}"
            )
        missing = [v for v in given if v not in names]
        if missing:
            raise ExperimentBenchError(
                f"--experiment-versions: {', '.join(missing)} not in {root} "
                f"(it holds {', '.join(sorted(names))})"
            )
        return root, {"A": given[0], "B": given[1], "C": given[2] if len(given) == 3 else given[1]}
    served = read_default(root) or (listed[-1].name if listed else None)
    if served is None or served not in names:
        raise ExperimentBenchError(f"--models {root}: no published version to copy for the experiment")
    private = out / "experiment-models"
    if private.exists():
        shutil.rmtree(private)
    private.mkdir(parents=True)
    shutil.copytree(root / served, private / served)
    base = served[:16]  # vYYYYMMDD-HHMMSS; the copies sort after it, so DEFAULT keeps it served
    copies = [f"{base}-{900_000 + i}" for i in (1, 2)]
    for name in copies:
        shutil.copytree(root / served, private / name)
    write_default(private, served)
    return private, {"A": served, "B": copies[0], "C": copies[1]}


def experiment_arms(versions: dict[str, str], state: str) -> list[Any]:
    from recstack.experiments.assign import Arm

    arms = [Arm("A", versions["A"], 0.5), Arm("B", versions["B"], 0.5)]
    if state == "shadow":
        arms.append(Arm("C", versions["C"], 0.0, shadow=True))
    return arms


class StateWriter:
    """Sets and clears the bench's experiment in ``redis`` (recstack.experiments.state); refuses to
    touch an experiment someone else is running there."""

    def __init__(self, redis_url: str, versions: dict[str, str]) -> None:
        from recstack import redis_url as urls

        self.client = urls.connect(redis_url, socket_timeout=10.0)
        self.versions = versions
        self.generation = 0
        self.state: str | None = None
        self._check_free(redis_url)

    def _check_free(self, where: str) -> None:
        from recstack.experiments import state as st

        current = st.read(self.client)
        if current is not None and current.active and current.name != EXPERIMENT_NAME:
            raise ExperimentBenchError(
                f"experiment {current.name!r} is running in {where}: the bench will not replace it "
                "(stop it, or give --redis another database)"
            )

    def set(self, state: str) -> int:
        """Write ``state`` (one of :data:`STATES`); returns the generation the servers must reach."""
        from recstack.experiments import state as st

        if state == self.state:
            return self.generation
        if state == "none":
            current = st.read(self.client)
            stored = st.end(self.client) if current is not None and current.active else current
        else:
            experiment = st.new_experiment(EXPERIMENT_NAME, experiment_arms(self.versions, state))
            stored = st.write(self.client, experiment, replace_active=False)
        self.generation = stored.generation if stored is not None else 0
        self.state = state
        return self.generation

    def clear(self) -> None:
        from recstack.experiments import state as st

        try:
            current = st.read(self.client)
            if current is not None and current.active and current.name == EXPERIMENT_NAME:
                st.end(self.client)
        finally:
            self.client.close()


# --- the server's counters -----------------------------------------------------------------------

COUNTERS = {
    "recstack_shadow_batches_total": "shadow_batches",
    "recstack_impressions_published_total": "impressions_published",
    "recstack_impressions_dropped_total": "impressions_dropped",
    "recstack_impressions_failed_total": "impressions_failed",
    "recstack_experiment_version_refusals_total": "version_refusals",
}


def parse_metrics(text: str) -> dict[str, Any]:
    """The counters of :data:`COUNTERS` (shadow batches by outcome) and the experiment generation."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {"shadow_batches": {}, "generation": None}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = COUNTERS.get(sample.name)
            if key == "shadow_batches":
                outcome = sample.labels.get("outcome", "")
                out[key][outcome] = out[key].get(outcome, 0) + int(sample.value)
            elif key:
                out[key] = out.get(key, 0) + int(sample.value)
            elif sample.name == "recstack_experiment_generation":
                out["generation"] = int(sample.value)
    return out


def counter_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    delta: dict[str, Any] = {
        "shadow_batches": {
            k: v - before["shadow_batches"].get(k, 0) for k, v in sorted(after["shadow_batches"].items())
        }
    }
    for key in COUNTERS.values():
        if key != "shadow_batches":
            delta[key] = after.get(key, 0) - before.get(key, 0)
    return delta


def scrape(metrics_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        return parse_metrics(answer.read().decode())


# --- the server under test -----------------------------------------------------------------------


def experiment_spec(
    name: str, models: str | Path, redis: str, kafka_bootstrap: str, topic: str, extra: tuple[str, ...]
) -> tuple[ServerSpec, int]:
    """The real server with impressions on and ``/metrics`` on a free port (returned)."""
    metrics_port = free_port()
    argv = serve_command(
        "{port}",
        models,
        redis,
        metrics_port=metrics_port,
        extra_args=("--kafka-bootstrap", kafka_bootstrap, "--impressions-topic", topic, *extra),
    )
    # RECSTACK_EXPERIMENTS=off in the bench's environment must not turn routing off here.
    return ServerSpec(name, tuple(argv), env={"RECSTACK_EXPERIMENTS": "on"}), metrics_port


def wait_routed(
    server: ServerProcess, metrics_port: int, generation: int, request: bytes, state: str
) -> None:
    """Until the server routes by ``generation``: its gauge says so and an answer carries an arm
    exactly when an experiment runs (the arms' versions are loaded by then)."""
    import grpc

    from recstack.v1 import ranking_pb2

    deadline = time.monotonic() + WAIT_S
    seen = None
    with grpc.insecure_channel(server.address) as channel:
        rank = channel.unary_unary(
            "/recstack.v1.RankingService/Rank", response_deserializer=ranking_pb2.RankResponse.FromString
        )
        while time.monotonic() < deadline:
            seen = scrape(metrics_port).get("generation")
            if (seen or 0) >= generation:
                answer = rank(request, timeout=10.0)
                if bool(answer.arm) == (state != "none"):
                    return
            time.sleep(0.1)
    raise ExperimentBenchError(
        f"the server did not route by experiment generation {generation} ({state}) within {WAIT_S:.0f} s "
        f"(its generation: {seen}); {server.log_tail()}"
    )


# --- the rounds ----------------------------------------------------------------------------------


def run_rounds(
    runner: Any,
    set_state: Callable[[str], None],
    read_counters: Callable[[], dict[str, Any]],
    *,
    rate: float,
    rounds: int,
    min_calls: int,
    step_s: float,
    warmup_s: float,
    schedule: str,
    seed: int,
) -> dict[str, Any]:
    """Interleaved rounds at ``rate``: per state, each round's summary and the pooled figures."""
    duration_s = max(step_s, min_calls / rate)
    records: dict[str, list[StepRecord]] = {s: [] for s in STATES}
    rows: list[dict[str, Any]] = []
    counters: dict[str, list[dict[str, Any]]] = {s: [] for s in STATES}
    for i, (r, state) in enumerate(round_plan(STATES, rounds)):
        set_state(state)
        if warmup_s > 0:
            runner.run_step(rate, warmup_s, schedule, seed + 20_000 + i)
        before = read_counters()
        record = runner.run_step(rate, duration_s, schedule, seed + i)
        delta = counter_delta(before, read_counters())
        step = summarize_step(record, offered_rate=rate, duration_s=duration_s)
        step.pop("histogram_ms", None)
        step.update(phase=f"{state} round {r + 1}", state=state, round=r + 1, counters=delta)
        log.info(
            "experiment %-6s round %d: %7.1f/s ok  p99 %s ms  cpu/call %s ms  shadow %s",
            state,
            r + 1,
            step["achieved_rate"] or 0.0,
            step["latency_ms"].get("p99"),
            (step.get("cpu", {}).get("server") or {}).get("ms_per_call"),
            delta["shadow_batches"],
        )
        rows.append(step)
        records[state].append(record)
        counters[state].append(delta)
    pooled = {s: pool(records[s], counters[s], rate, duration_s) for s in STATES}
    for state, figures in pooled.items():
        figures["round_p99_ms"] = [s["latency_ms"].get("p99") for s in rows if s["state"] == state]
    return {
        "rate": round(rate, 3),
        "rounds": rounds,
        "calls_per_round": int(round(duration_s * rate)),
        "order": [s for _, s in round_plan(STATES, rounds)],
        "steps": rows,
        "states": pooled,
        "verdict": verdict(pooled),
    }


def pool(
    records: list[StepRecord], counters: list[dict[str, Any]], rate: float, duration_s: float
) -> dict[str, Any]:
    """One state's figures over all its rounds: p99 of all their calls, CPU over all their calls."""
    merged = StepRecord.merge(records)
    seconds: dict[str, float] = {}
    for record in records:
        for who, reading in record.cpu.items():
            seconds[who] = seconds.get(who, 0.0) + reading["seconds"]
    merged.cpu = {who: {"seconds": s, "source": "summed over rounds"} for who, s in seconds.items()}
    step = summarize_step(merged, offered_rate=rate, duration_s=duration_s * len(records))
    total: dict[str, Any] = {"shadow_batches": {}}
    for delta in counters:
        for k, v in delta["shadow_batches"].items():
            total["shadow_batches"][k] = total["shadow_batches"].get(k, 0) + v
        for k, v in delta.items():
            if k != "shadow_batches":
                total[k] = total.get(k, 0) + v
    return {
        "calls": step["scheduled"],
        "ok": step["ok"],
        "error_rate": step["error_rate"],
        "latency_ms": step["latency_ms"],
        "cpu_ms_per_call": (step.get("cpu", {}).get("server") or {}).get("ms_per_call"),
        "generator_cpu_ms_per_call": (step.get("cpu", {}).get("generator") or {}).get("ms_per_call"),
        "round_p99_ms": [],
        "counters": total,
    }


def verdict(states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each state against ``none``: p99 difference (ms) and CPU per call difference (ratio), and
    whether the shadow's meet the issue's targets (None where a figure is missing)."""
    base = states.get("none") or {}
    out: dict[str, Any] = {"p99_target_ms": SHADOW_P99_TARGET_MS, "cpu_target": SHADOW_CPU_TARGET}
    for state in STATES[1:]:
        other = states.get(state) or {}
        p99, p99_base = other.get("latency_ms", {}).get("p99"), base.get("latency_ms", {}).get("p99")
        cpu, cpu_base = other.get("cpu_ms_per_call"), base.get("cpu_ms_per_call")
        d_p99 = None if p99 is None or p99_base is None else round(p99 - p99_base, 3)
        d_cpu = None if not cpu or not cpu_base else round(cpu / cpu_base - 1.0, 4)
        out[state] = {"p99_delta_ms": d_p99, "cpu_delta": d_cpu}
    # The rounds' p99 within one state differ by this much: a p99 difference below it is noise.
    spreads = []
    for state in STATES:
        p99s = [p for p in (states.get(state) or {}).get("round_p99_ms", []) if p is not None]
        if len(p99s) > 1:
            spreads.append(max(p99s) - min(p99s))
    out["round_p99_spread_ms"] = round(max(spreads), 3) if spreads else None
    shadow = out["shadow"]
    shadow["p99_met"] = (
        None if shadow["p99_delta_ms"] is None else shadow["p99_delta_ms"] <= SHADOW_P99_TARGET_MS
    )
    shadow["cpu_met"] = None if shadow["cpu_delta"] is None else shadow["cpu_delta"] <= SHADOW_CPU_TARGET
    # Against the A/B experiment alone: what the shadow arm itself adds.
    ab, sh = states.get("ab") or {}, states.get("shadow") or {}
    p99_ab, p99_sh = ab.get("latency_ms", {}).get("p99"), sh.get("latency_ms", {}).get("p99")
    shadow["p99_delta_vs_ab_ms"] = None if p99_ab is None or p99_sh is None else round(p99_sh - p99_ab, 3)
    cpu_ab, cpu_sh = ab.get("cpu_ms_per_call"), sh.get("cpu_ms_per_call")
    shadow["cpu_delta_vs_ab"] = None if not cpu_ab or not cpu_sh else round(cpu_sh / cpu_ab - 1.0, 4)
    return out


# --- inside recstack bench -----------------------------------------------------------------------


def bench_rounds(
    cfg: Any, requests: list[bytes], slo_rate: float | None, versions: tuple[Path, dict[str, str]]
) -> dict[str, Any]:
    """Start the experiment server, run :func:`run_rounds` at ``cfg.experiment_rate_fraction`` of
    ``slo_rate``, stop it and clear the experiment. Failures are recorded, never raised."""
    from loadtests.cpu import CpuMeter, available
    from loadtests.openloop import GeneratorError, OpenLoopGenerator
    from loadtests.saturation import MeteredRunner
    from loadtests.servers import ServerFailed

    models, arm_versions = versions
    given = bool(cfg.experiment_rate)
    rate = cfg.experiment_rate if given else cfg.experiment_rate_fraction * (slo_rate or 0.0)
    result: dict[str, Any] = {
        "status": "ok",
        "error": None,
        "slo_rate": slo_rate,
        "rate_given": given,
        "rate_fraction": None if given else cfg.experiment_rate_fraction,
        "versions": arm_versions,
        "models": str(models),
        "impressions_topic": cfg.impressions_topic,
    }
    spec, metrics_port = experiment_spec(
        "real-experiments", models, cfg.redis, cfg.kafka_bootstrap, cfg.impressions_topic, cfg.serve_args
    )
    server = ServerProcess(spec, cfg.out / "server-real-experiments.log")
    result["argv"] = server.argv
    writer: StateWriter | None = None
    try:
        writer = StateWriter(cfg.redis, arm_versions)
        writer.set("none")
        result["startup_s"] = round(server.start(cfg.start_timeout_s), 2)
        with OpenLoopGenerator(server.address, "Rank", requests, cfg.generator) as generator:
            runner: Any = generator
            if available() and server.pid is not None:
                runner = MeteredRunner(
                    generator, {"server": CpuMeter([server.pid]), "generator": CpuMeter(generator.pids)}
                )
            state_writer = writer

            def set_state(state: str) -> None:
                wait_routed(server, metrics_port, state_writer.set(state), requests[0], state)

            result.update(
                run_rounds(
                    runner,
                    set_state,
                    lambda: scrape(metrics_port),
                    rate=rate,
                    rounds=cfg.experiment_rounds,
                    min_calls=cfg.experiment_min_calls,
                    step_s=cfg.search.step_s,
                    warmup_s=min(cfg.search.warmup_s, 2.0),
                    schedule=cfg.search.schedule,
                    seed=cfg.seed + 3_000,
                )
            )
    except (ServerFailed, GeneratorError, ExperimentBenchError, OSError) as exc:
        log.error("experiment rounds: %s", exc)
        result.update(status="failed", error=str(exc))
    finally:
        result["exit_code"] = server.stop()
        if writer is not None:
            writer.clear()
    return result


def ladder_spec(cfg: Any, versions: tuple[Path, dict[str, str]]) -> tuple[ServerSpec, int]:
    """The real server for ``--experiment-ladder`` (named ``real-ab``): impressions on."""
    spec, port = experiment_spec(
        "real-ab", versions[0], cfg.redis, cfg.kafka_bootstrap, cfg.impressions_topic, cfg.serve_args
    )
    return spec, port


class LadderExperiment:
    """Around the ``real-ab`` ladder: the A/B experiment set before its server starts, waited for
    once it is up (:meth:`ready`), cleared after."""

    def __init__(
        self, cfg: Any, versions: tuple[Path, dict[str, str]], metrics_port: int, request: bytes
    ) -> None:
        self.writer = StateWriter(cfg.redis, versions[1])
        self.generation = self.writer.set("ab")
        self.metrics_port = metrics_port
        self.request = request

    def ready(self, server: ServerProcess) -> None:
        from loadtests.servers import ServerFailed

        try:
            wait_routed(server, self.metrics_port, self.generation, self.request, "ab")
        except ExperimentBenchError as exc:
            raise ServerFailed(str(exc)) from None

    def counters(self) -> dict[str, Any]:
        return scrape(self.metrics_port)

    def clear(self) -> None:
        self.writer.clear()


def check_topic(bootstrap: str, topic: str) -> None:
    """The impressions topic must exist: the servers would count every impression as failed."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    from recstack.kafka import kafka_security_from_env

    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            request_timeout_ms=15_000,
            **kafka_security_from_env().client_options(),
        )
        try:
            topics = consumer.topics()
        finally:
            consumer.close()
    except KafkaError as exc:
        raise ExperimentBenchError(f"--kafka-bootstrap {bootstrap}: cannot list topics: {exc}") from None
    if topic not in topics:
        raise ExperimentBenchError(
            f"--impressions-topic {topic}: no such topic on {bootstrap} (infra/up.sh creates "
            "rank-impressions; or create one and name it)"
        )


def run(cfg: Any, requests: list[bytes], results: dict[str, Any]) -> None:
    """The ``--experiment-ladder`` server (``results["servers"]["real-ab"]``) and the
    ``--experiments`` rounds (``results["experiments"]``), after the plain servers."""
    from loadtests.saturation import bench_server, real_server_steps

    try:
        check_topic(cfg.kafka_bootstrap, cfg.impressions_topic)
        versions = prepare_versions(cfg.models, cfg.out, cfg.experiment_versions)
    except (ExperimentBenchError, OSError) as exc:
        log.error("experiments: %s", exc)
        failed = {"status": "failed", "error": str(exc)}
        if cfg.experiment_ladder:
            results["servers"]["real-ab"] = {"name": "real-ab", **failed}
        if cfg.experiments:
            results["experiments"] = failed
        return
    if cfg.experiment_ladder:
        spec, metrics_port = ladder_spec(cfg, versions)
        naive = results["servers"].get("naive", {})
        real_extra = real_server_steps(cfg, naive.get("peak_rate") if naive.get("status") == "ok" else None)
        try:
            ladder = LadderExperiment(cfg, versions, metrics_port, requests[0])
        except ExperimentBenchError as exc:
            results["servers"]["real-ab"] = {"name": "real-ab", "status": "failed", "error": str(exc)}
        else:

            def extra(runner: Any, result: dict[str, Any]) -> None:
                real_extra(runner, result)
                result["experiment_counters"] = ladder.counters()

            try:
                results["servers"]["real-ab"] = bench_server(
                    spec, cfg, requests, extra, on_start=ladder.ready
                )
            finally:
                ladder.clear()
            results["servers"]["real-ab"]["versions"] = versions[1]
    if cfg.experiments:
        real = results["servers"].get("real") or {}
        slo_rate = real.get("slo_rate") if real.get("status") == "ok" else None
        if not slo_rate and not cfg.experiment_rate:
            results["experiments"] = {
                "status": "failed",
                "error": "the real server has no SLO rate in this run: nothing to take "
                f"{100 * cfg.experiment_rate_fraction:g}% of (--experiment-rate sets the rounds' rate)",
            }
            return
        results["experiments"] = bench_rounds(cfg, requests, slo_rate, versions)


# --- the report ----------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _met(value: bool | None) -> str:
    return "-" if value is None else ("met" if value else "not met")


def render(results: dict[str, Any]) -> list[str]:
    """The summary's ``## Experiments`` section (empty when the run had no rounds)."""
    exp = results.get("experiments")
    if not exp:
        return []
    lines = ["## Experiments: what they cost the real server", ""]
    if exp.get("status") != "ok":
        return [*lines, f"The rounds failed: {' '.join(str(exp.get('error')).split())}", ""]
    versions = exp.get("versions", {})
    if exp.get("rate_given"):
        basis = f"as given; its max rate at the SLO in this run: {_f(exp.get('slo_rate'), 1)}/s"
    else:
        share = 100 * (exp.get("rate_fraction") or 0.5)
        basis = f"{share:g}% of its max rate at the SLO, {_f(exp.get('slo_rate'), 1)}/s"
    lines += [
        f"The real server at {_f(exp.get('rate'), 1)}/s ({basis}), impressions on (topic "
        f"`{exp.get('impressions_topic')}`), one process for every state; {exp.get('rounds')} rounds of "
        f"each state of {exp.get('calls_per_round')} calls, in the order {' '.join(exp.get('order', []))}. "
        f"A/B: A = {versions.get('A')}, B = {versions.get('B')}, 50/50; shadow: C = {versions.get('C')}. "
        "p99 over all of a state's calls; CPU per call: the server's process tree over all of them.",
        "",
        "| state | calls | p50 ms | p99 ms | p99 per round ms | server CPU ms/call | vs none: p99 "
        "| vs none: CPU "
        "| shadow batches scored / dropped / over budget | impressions published / dropped / failed |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    verdict = exp.get("verdict", {})
    for state in STATES:
        s = exp["states"].get(state) or {}
        v = verdict.get(state) or {}
        c = s.get("counters") or {}
        b = c.get("shadow_batches") or {}
        lines.append(
            f"| {state} | {s.get('calls', '-')} | {_f(s.get('latency_ms', {}).get('p50'))} | "
            f"{_f(s.get('latency_ms', {}).get('p99'))} | "
            f"{', '.join(_f(p) for p in s.get('round_p99_ms', []))} | {_f(s.get('cpu_ms_per_call'), 3)} | "
            f"{_f(v.get('p99_delta_ms')) if state != 'none' else '-'} | "
            f"{_pct(v.get('cpu_delta')) if state != 'none' else '-'} | "
            f"{b.get('scored', 0)} / {b.get('dropped', 0)} / {b.get('over_budget', 0)} | "
            f"{c.get('impressions_published', 0)} / {c.get('impressions_dropped', 0)} / "
            f"{c.get('impressions_failed', 0)} |"
        )
    shadow = verdict.get("shadow") or {}
    lines += [
        "",
        "| target (shadow against no experiment, same run) | this run | target | met |",
        "|---|---:|---:|---|",
        f"| p99 difference | {_f(shadow.get('p99_delta_ms'))} ms "
        f"| <= {verdict.get('p99_target_ms', 1.0):g} ms "
        f"| {_met(shadow.get('p99_met'))} |",
        f"| CPU per call difference | {_pct(shadow.get('cpu_delta'))} | <= "
        f"{100 * verdict.get('cpu_target', 0.1):g}% | {_met(shadow.get('cpu_met'))} |",
        f"| (the shadow arm alone: against A/B) | p99 {_f(shadow.get('p99_delta_vs_ab_ms'))} ms, "
        f"CPU {_pct(shadow.get('cpu_delta_vs_ab'))} | | |",
        "",
    ]
    spread = verdict.get("round_p99_spread_ms")
    if spread is not None and spread > verdict.get("p99_target_ms", SHADOW_P99_TARGET_MS):
        lines += [
            f"**Warning:** one state's rounds differ by up to {spread:.2f} ms in p99, more than the "
            f"{verdict.get('p99_target_ms', SHADOW_P99_TARGET_MS):g} ms the target allows: the p99 verdict "
            "is within the noise of this run (a busy machine?). Re-run on a quiet machine.",
            "",
        ]
    return lines
