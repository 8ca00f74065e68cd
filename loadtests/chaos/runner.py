"""The chaos run: bring the stack up, keep traffic flowing, inject each fault, check, report.

For every fault of the schedule: a window of open-loop Rank and Recommend calls (two load
processes from :mod:`loadtests.openloop`, client-side round robin over two ranking servers) with
events flowing into Kafka; the fault is injected ``pre_s`` into the window and healed; then the
event traffic pauses, the stream drains, and the checks run: features equal the truth from every
acknowledged event so far, the dead-letter topic holds exactly the malformed records, the
ranking error mix, p99 before / during / after, recovery time, and the fault's own checks.

The run knows no fault by name: each one is a class of :mod:`loadtests.chaos.faults` (its spec
and its code), and this module is the loop around them and the stack they act on. The attributes
and public methods of :class:`ChaosRun` are what a fault's code may use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.chaos import faults
from loadtests.chaos import report as rep
from loadtests.chaos.experiment import ExperimentStack
from loadtests.chaos.faults.base import (
    LOG_ROLL_S,
    SERVING_TIMEOUT_S,
    SESSION_TIMEOUT_MS,
    FaultSpec,
    Window,
    last_assignment,
    retry,
    sleep_until,
)
from loadtests.chaos.report import Check, FaultResult
from loadtests.chaos.stack import (
    RECSTACK,
    REPO,
    DeadLetters,
    EventLogDisk,
    Infra,
    Service,
    StreamState,
    copy_newest_version,
    free_port,
    scrape,
    set_priority,
    wait_serving,
)
from loadtests.chaos.traffic import EventTraffic
from loadtests.chaos.truth import compare, expected_features
from loadtests.stats import StepRecord

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 120.0
# Why a fault that needs a part of the stack the run does not manage is skipped (Fault.needs).
_INFRA_NAMES = {"kafka": "the broker", "redis": "Redis"}


@dataclass
class ChaosConfig:
    out: Path
    faults: list[FaultSpec]
    kafka_port: int = 9092
    redis_port: int = 6379
    redis_db: int = 0
    attribution_db: int | None = None  # the attribution consumers' database (None: redis_db)
    models: Path | None = None
    event_rate: float = 400.0
    rank_rate: float = 40.0
    recommend_rate: float = 10.0
    candidates: int = 100
    dup_share: float = 0.05
    bad_share: float = 0.01
    train_events: int = 20_000
    half_life_s: float = 6 * 3600.0
    command: str = "recstack chaos"
    quick: bool = False
    # How the stream consumers, the broker and the event traffic yield the cores to the ranking
    # servers (stack.BACKGROUND_PRIORITIES), as machines of their own would in production.
    background_priority: str = "idle"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/{self.redis_db}"


class ChaosRun:
    def __init__(self, config: ChaosConfig) -> None:
        self.cfg = config
        self.run_id = "chaos" + uuid.uuid4().hex[:6]
        self.topic = f"{self.run_id}-events"
        self.dlq = f"{self.topic}.dlq"
        self.group = f"{self.run_id}-stream"
        self.out = config.out
        self.logs = self.out / "logs"
        self.models = self.out / "models"
        self.infra = Infra(config.kafka_port, config.redis_port)
        self.disk = EventLogDisk(self.out / "eventlog")
        self.consumers: list[Service] = []
        self.consumer_metrics: list[int] = []
        self.servers: list[Service] = []
        self.server_ports: list[int] = []
        self.server_metrics: list[int] = []
        self.exp = ExperimentStack(self)  # impressions, the A/B experiment, attribution consumers
        self.traffic: EventTraffic | None = None
        self.state: StreamState | None = None
        self.letters: DeadLetters | None = None
        self.generators: list[Any] = []
        self.model_version = ""
        self.vocab: list[str] = []
        self.results: list[FaultResult] = []
        self.points: list[dict[str, Any]] = []
        self.origin: float | None = None
        self._t0 = time.monotonic()
        self.remaining: set[str] = set()  # faults still to come after the current one

    # ------------------------------------------------------------------------------ progress

    def say(self, text: str) -> None:
        print(f"[chaos {time.monotonic() - self._t0:6.1f}s] {text}", flush=True)

    # ------------------------------------------------------------------------------ the run

    def run(self) -> list[FaultResult]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self._bring_up()
            for k, spec in enumerate(self.cfg.faults, 1):
                self.remaining = {f.name for f in self.cfg.faults[k:]}
                self.say(
                    f"fault {k}/{len(self.cfg.faults)}: {spec.name} ({spec.title}), ~{spec.window_s:.0f} s"
                )
                result = self._one_fault(spec, seed=k)
                self.results.append(result)
                verdict = (
                    "skipped: " + result.skipped if result.skipped else ("pass" if result.ok else "FAIL")
                )
                self.say(f"  {spec.name}: {verdict}; {rep.figures_text(result.figures)}")
                for c in result.checks:
                    if not c.ok:
                        self.say(f"    failed check: {c.name} ({c.detail})")
        finally:
            self._tear_down()
        return self.results

    def write(self, wall_s: float) -> dict[str, Path]:
        meta = {
            "command": self.cfg.command,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_s": round(wall_s, 1),
            "event_rate": self.cfg.event_rate,
            "dup_share": self.cfg.dup_share,
            "bad_share": self.cfg.bad_share,
            "rank_rate": self.cfg.rank_rate,
            "recommend_rate": self.cfg.recommend_rate,
            "servers": len(self.server_ports),
            "consumers": len(self.consumers),
            "model_version": self.model_version,
            "arms": self.exp.arms,
            "followup_events": None if self.traffic is None else self.traffic.followup_events,
            "events_sent": None if self.traffic is None else self.traffic.stats.__dict__,
        }
        return rep.write_report(self.out, self.results, meta, self.points)

    # ------------------------------------------------------------------------------ set-up

    def _bring_up(self) -> None:
        cfg = self.cfg
        self.say(f"starting Kafka (port {cfg.kafka_port}) and Redis (port {cfg.redis_port}) with infra/up.sh")
        self.infra.up()
        self.deprioritize_broker()
        self.infra.create_topics(cfg.bootstrap, {self.topic: 6, self.dlq: 6, self.exp.topic: 6})
        self.exp.clear_attribution_state()
        if any("disk" in faults.get(f.name).needs for f in cfg.faults):
            self.disk.mount()
        else:
            self.disk.path.mkdir(parents=True, exist_ok=True)
        if not self.disk.mounted and self.disk.why_not:
            self.say(
                f"event log on an ordinary folder ({self.disk.why_not}): the disk faults will be skipped"
            )
        self._start_consumers()  # they start up while the model trains
        self.exp.start_consumers()
        self._model()
        self.exp.start_experiment()
        self._start_servers()

        self.traffic = EventTraffic(
            cfg.bootstrap, self.topic, self.run_id, cfg.event_rate, cfg.dup_share, cfg.bad_share,
            priority=cfg.background_priority, followup=self.exp.followup,
        )  # fmt: skip
        self.state = StreamState(cfg.redis_url, cfg.bootstrap, self.topic, self.group)
        self.letters = DeadLetters(cfg.bootstrap, self.dlq)
        self._start_generators()
        self.say("warming up: events and calls for a few seconds, until both consumers hold partitions")
        self.traffic.start()
        self._run_load(3.0, seed=0)
        self.wait_consumers_assigned(60.0)
        self.traffic.pause()
        waited = self.state.wait_applied(self.traffic.last_offsets(), DRAIN_TIMEOUT_S)
        if waited is None:
            raise RuntimeError("the stream consumers did not apply the warm-up events; see " + str(self.logs))
        self.say(f"stack ready: model {self.model_version}, servers on ports {self.server_ports}")

    def _model(self) -> None:
        cfg = self.cfg
        if cfg.models is not None:
            version = copy_newest_version(cfg.models, self.models)
            self.say(f"model: serving a copy of {version.name} from {cfg.models}")
        else:
            self.say(f"model: training a small one on {cfg.train_events:,} synthetic events (~15-30 s)")
            import subprocess

            with (self.logs / "train.log").open("w") as fh:
                result = subprocess.run(
                    [*RECSTACK, "train", "--events", "synthetic", "--synthetic-events", str(cfg.train_events),
                     "--epochs", "1", "--no-bench", "--no-progress", "--out", str(self.models)],
                    stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                )  # fmt: skip
            if result.returncode != 0:
                raise RuntimeError(f"training the model failed; see {self.logs / 'train.log'}")
            from models.artifacts import list_versions

            version = list_versions(self.models)[-1]
        self.model_version = version.name
        import json

        self.vocab = [str(x) for x in json.loads((version / "vocab.json").read_text())]

    def deprioritize_broker(self) -> None:
        """The broker's threads at the background priority (again, after a restart)."""
        pid = self.infra.pid("kafka")
        priority = self.cfg.background_priority
        if priority != "normal" and pid is not None:
            threads = set_priority(pid, priority)
            self.say(f"Kafka broker (pid {pid}): {threads} threads at {priority} CPU priority")

    def _restore_broker(self) -> None:
        """A broker the run did not start (one of ``make up``) keeps running: as it was."""
        pid = self.infra.pid("kafka")
        if self.cfg.background_priority != "normal" and pid is not None and "kafka" not in self.infra.started:
            set_priority(pid, "normal")

    def _start_consumers(self) -> None:
        cfg = self.cfg
        for i in (1, 2):
            port = free_port()
            args = ["--log-level", "INFO", "stream", "--bootstrap", cfg.bootstrap, "--redis", cfg.redis_url,
                    "--group", self.group, "--topic", self.topic, "--dlq-topic", self.dlq,
                    "--event-log", str(self.disk.path), "--metrics-port", str(port),
                    "--session-timeout-ms", str(SESSION_TIMEOUT_MS), "--log-roll-s", str(LOG_ROLL_S),
                    "--max-batch", "500", "--trending-half-life-s", str(cfg.half_life_s),
                    "--client-id", f"{self.run_id}-{i}"]  # fmt: skip
            log_path = self.logs / f"stream-{i}.log"
            service = Service(f"stream-{i}", args, log_path, priority=cfg.background_priority)
            service.start()
            self.consumers.append(service)
            self.consumer_metrics.append(port)
        self.say(f"stream consumers started (pids {[c.pid for c in self.consumers]}), logs in {self.logs}")

    def _start_servers(self) -> None:
        cfg = self.cfg
        for i in (1, 2):
            port, metrics_port = free_port(), free_port()
            args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--models", str(self.models),
                    "--redis", cfg.redis_url, "--metrics-port", str(metrics_port), "--model-poll-interval-s",
                    "1", "--grace-period-s", "5", *self.exp.server_args()]  # fmt: skip
            service = Service(f"serve-{i}", args, self.logs / f"serve-{i}.log")
            service.start()
            self.servers.append(service)
            self.server_ports.append(port)
            self.server_metrics.append(metrics_port)
        for service, port in zip(self.servers, self.server_ports, strict=True):
            if not wait_serving(port, SERVING_TIMEOUT_S):
                raise RuntimeError(
                    f"{service.name} is not SERVING after {SERVING_TIMEOUT_S:.0f} s; see its log"
                )
        self.say(f"ranking servers SERVING on ports {self.server_ports}")

    def _start_generators(self) -> None:
        from loadtests.openloop import GeneratorConfig, OpenLoopGenerator
        from loadtests.workload import Workload, rank_requests, recommend_requests

        assert self.traffic is not None
        workload = Workload(users=self.traffic.users, items=self.vocab, categories={})
        address = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in self.server_ports)
        gen_cfg = GeneratorConfig(
            workers=1, channels=2, timeout_s=1.0, channel_options=(("grpc.lb_policy_name", "round_robin"),)
        )
        rank = rank_requests(workload, 2_000, self.cfg.candidates, seed=1)
        recommend = recommend_requests(workload, 500, k=20, seed=2)
        for method, requests in (("Rank", rank), ("Recommend", recommend)):
            generator = OpenLoopGenerator(address, method, requests, gen_cfg)
            generator.start()
            self.generators.append(generator)

    def _run_load(self, duration_s: float, seed: int) -> tuple[threading.Thread, list[StepRecord], float]:
        """Start one open-loop step per generator in threads; returns (joiner, records, start time)."""
        records: list[StepRecord] = []
        errors: list[BaseException] = []
        rates = (self.cfg.rank_rate, self.cfg.recommend_rate)

        def one(generator: Any, rate: float) -> None:
            try:
                records.append(generator.run_step(rate, duration_s, schedule="poisson", seed=seed))
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=one, args=(g, r), daemon=True)
            for g, r in zip(self.generators, rates, strict=True)
        ]
        start = time.monotonic() + 0.25  # openloop.START_DELAY_S
        for t in threads:
            t.start()

        def join() -> None:
            for t in threads:
                t.join()
            if errors:
                raise errors[0]

        joiner = threading.Thread(target=join, daemon=True)
        joiner.start()
        if duration_s <= 5:
            joiner.join()
        return joiner, records, start

    def wait_consumers_assigned(self, timeout_s: float) -> bool:
        """Wait until both consumers' newest processes hold partitions."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(last_assignment(c.log_text()) for c in self.consumers):
                return True
            time.sleep(0.5)
        self.say("warning: not both consumers hold partitions yet; continuing")
        return False

    def scrape_sum(self, metric: str) -> float:
        """A counter of the consumers' metrics, summed over both (a missing one counts 0)."""
        return sum(scrape(port, metric) or 0.0 for port in self.consumer_metrics)

    # ------------------------------------------------------------------------------ one fault

    def _one_fault(self, spec: FaultSpec, seed: int) -> FaultResult:
        assert self.traffic is not None and self.state is not None
        result = FaultResult(spec.name, spec.title, spec.checks)
        fault_type = faults.get(spec.name)
        skip = self._skip_reason(spec.name)
        if skip:
            result.skipped = skip
            return result
        window = Window(spec, result)
        window.allowed_codes = window.allowed_codes | fault_type.also_allowed
        fault = fault_type(self, window)
        result.figures["load_avg"] = round(os.getloadavg()[0], 1)  # how busy the machine was
        self.traffic.start()
        joiner, records, window.start = self._run_load(spec.window_s, seed)
        if self.origin is None:
            self.origin = window.start
        sleep_until(window.start + spec.pre_s)
        window.fault_start = time.monotonic()
        injected = False
        try:
            fault.inject()
            injected = True
        except Exception as exc:  # the fault itself could not be carried out: say so in the table
            log.exception("fault %s", spec.name)
            result.check("fault injected", False, repr(exc))
        window.fault_end = time.monotonic()
        target = self.traffic.last_offsets()
        lag_thread = threading.Thread(
            target=lambda: window.lag_recovery.append(self.state.wait_applied(target, 60.0)),  # type: ignore[union-attr]
            daemon=True,
        )
        lag_thread.start()
        joiner.join()
        window.end = time.monotonic()
        self.traffic.pause()
        lag_thread.join()
        record = StepRecord.merge(records)
        self._ranking_checks(window, record)
        if injected:
            fault.check(record)
        self._stream_checks(window)
        if fault_type.checks_experiment or not self.remaining:
            self.exp.check(result)  # impressions and attribution: after the faults on their path, and last
        origin = self.origin
        result.times = {
            "start": round(window.start - origin, 2),
            "fault_start": round(window.fault_start - origin, 2),
            "fault_end": round(window.fault_end - origin, 2),
            "end": round(window.end - origin, 2),
        }
        self.points += rep.timeline(record, origin)
        return result

    def _skip_reason(self, name: str) -> str:
        """Why the fault ``name`` cannot run here ("" when it can): a part it needs is missing."""
        for need in faults.get(name).needs:
            if need == "disk" and not self.disk.mounted:
                return self.disk.why_not
            if need in _INFRA_NAMES and need not in self._managed():
                return (
                    f"{_INFRA_NAMES[need]} was not started by infra/ (no pid file), so it cannot be restarted"
                )
        return ""

    def _managed(self) -> set[str]:
        return {s for s in ("kafka", "redis") if self.infra.running(s)}

    # ------------------------------------------------------------------------------ checks

    def _ranking_checks(self, w: Window, record: StepRecord) -> None:
        r = w.result
        before = rep.window_stats(record, w.start, w.fault_start)
        during = rep.window_stats(record, w.fault_start, max(w.fault_end, w.fault_start + 1.0))
        after = rep.window_stats(record, w.fault_end, w.end)
        whole = rep.window_stats(record, w.start, w.end + 10.0)
        recovery = rep.recovery_s(record, w.fault_end, w.end)
        # On a shared machine the baseline itself may sit above the SLO: also say when p99 came
        # back to where it was before the fault (a figure; the check stays the SLO's).
        baseline = max(rep.SLO_P99_MS, before["p99_ms"] or 0.0)
        r.figures["recovery_baseline_s"] = rep.recovery_s(record, w.fault_end, w.end, slo_ms=baseline)
        r.figures["calls"] = whole["calls"]
        r.figures["p99_ms"] = {
            "before": before["p99_ms"],
            "during": during["p99_ms"],
            "after": after["p99_ms"],
        }
        r.figures["errors"] = whole["errors"]
        r.figures["degraded"] = whole["degraded"]
        r.figures["recovery_p99_s"] = recovery
        codes = w.allowed_codes
        bad = {k: v for k, v in whole["errors"].items() if k not in codes}
        r.check(
            ("ranking errors only " + "/".join(sorted(codes))) if codes else "no ranking call failed",
            not bad,
            f"{whole['calls']} calls, errors {whole['errors'] or 'none'}",
        )
        r.check(
            f"p99 back under {rep.SLO_P99_MS:g} ms within {rep.RECOVERY_TARGET_S:g} s of the fault's end",
            recovery is not None and recovery <= rep.RECOVERY_TARGET_S,
            "never" if recovery is None else f"+{recovery:.2f} s",
        )

    def _stream_checks(self, w: Window) -> None:
        assert self.traffic is not None and self.state is not None and self.letters is not None
        r = w.result
        lag = w.lag_recovery[0] if w.lag_recovery else None
        r.figures["recovery_lag_s"] = None if lag is None else round(max(0.0, lag), 2)
        if self.traffic.stats.failures:
            r.check("every event published", False, f"{len(self.traffic.stats.failures)} sends failed: "
                    f"{self.traffic.stats.failures[0]}")  # fmt: skip
        waited = self.state.wait_applied(self.traffic.last_offsets(), DRAIN_TIMEOUT_S)
        r.check("stream caught up", waited is not None, "every published record applied" if waited is not None
                else f"not within {DRAIN_TIMEOUT_S:.0f} s")  # fmt: skip
        truth = self._truth()
        r.figures["events"] = f"{truth.events:,}"
        r.check("features = truth (none lost, none applied twice)", truth.ok, truth.summary())
        expected = self.traffic.malformed()
        sources = self.letters.collect(expected)
        got = set(sources)
        r.check(
            "DLQ = malformed sent",
            got == expected,
            f"{len(expected)} malformed sent, {len(got)} in the DLQ"
            + (f" ({sum(sources.values()) - len(got)} repeated)" if sum(sources.values()) > len(got) else ""),
        )

    def _truth(self):
        from feature_store.reads import read_features

        assert self.traffic is not None and self.state is not None
        users, items = expected_features(self.traffic.acked(), self.cfg.half_life_s)
        got_users: dict[str, Any] = {}
        got_items: dict[str, Any] = {}
        user_ids, item_ids = sorted(users), sorted(items)
        for i in range(0, max(len(user_ids), len(item_ids)), 500):
            u, it = user_ids[i : i + 500], item_ids[i : i + 500]
            read_u, read_i = retry(lambda u=u, it=it: read_features(self.state.redis, u, it))  # type: ignore[union-attr]
            got_users.update(zip(u, read_u, strict=True))
            got_items.update(zip(it, read_i, strict=True))
        return compare(users, items, got_users, got_items)

    # ------------------------------------------------------------------------------ tear-down

    def _tear_down(self) -> None:
        self.say("stopping what the run started")
        for generator in self.generators:
            with contextlib.suppress(Exception):
                generator.close()
        if self.traffic is not None:
            with contextlib.suppress(Exception):
                self.traffic.close()
        for service in [*self.servers, *self.consumers]:
            with contextlib.suppress(Exception):
                service.stop()
        with contextlib.suppress(Exception):
            self.exp.stop()
        for closer in (self.letters, self.state):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        self.disk.unmount()
        with contextlib.suppress(Exception):
            _delete_topics(self.cfg.bootstrap, [self.topic, self.dlq, self.exp.topic])
        self._restore_broker()
        self.infra.down()


# ---------------------------------------------------------------------------------- helpers


def _delete_topics(bootstrap: str, topics: list[str]) -> None:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="recstack-chaos", request_timeout_ms=10_000
    )
    try:
        admin.delete_topics(topics, timeout_ms=10_000, raise_errors=False)
    finally:
        admin.close()


def checks_passed(results: list[FaultResult]) -> bool:
    return all(r.ok or r.skipped for r in results) and any(not r.skipped for r in results)


__all__ = ["ChaosConfig", "ChaosRun", "Check", "checks_passed"]
