"""The chaos run: bring the stack up, keep traffic flowing, inject each fault, check, report.

For every fault of the schedule: a window of open-loop Rank and Recommend calls (two load
processes from :mod:`loadtests.openloop`, client-side round robin over two ranking servers) with
events flowing into Kafka; the fault is injected ``pre_s`` into the window and healed; then the
event traffic pauses, the stream drains, and the checks run: features equal the truth from every
acknowledged event so far, the dead-letter topic holds exactly the malformed records, the
ranking error mix, p99 before / during / after, recovery time, and the fault's own checks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.chaos import report as rep
from loadtests.chaos.report import Check, FaultResult
from loadtests.chaos.schedule import FaultSpec
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
    served_version,
    set_priority,
    wait_serving,
)
from loadtests.chaos.traffic import EventTraffic
from loadtests.chaos.truth import compare, expected_features
from loadtests.stats import StepRecord

log = logging.getLogger(__name__)

SESSION_TIMEOUT_MS = 6_000  # the broker's minimum: a stopped consumer's partitions move soonest
LOG_ROLL_S = 2.0
DRAIN_TIMEOUT_S = 120.0
SERVING_TIMEOUT_S = 120.0
# Statuses a ranking client may see while a dependency misbehaves (docs/CONTRACT.md section 5): the
# server sheds (RESOURCE_EXHAUSTED) or the call's deadline passes; everything else is a failure.
ALLOWED_CODES = frozenset({"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})
_REPLAYED = "recstack_stream_events_replayed_total"
_REWINDS = "recstack_stream_fence_rewinds_total"
_REWOUND = "recstack_stream_fence_rewound_records_total"


@dataclass
class ChaosConfig:
    out: Path
    faults: list[FaultSpec]
    kafka_port: int = 9092
    redis_port: int = 6379
    redis_db: int = 0
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


@dataclass
class _Window:
    spec: FaultSpec
    result: FaultResult
    start: float = 0.0  # monotonic time the window's first call is scheduled at
    fault_start: float = 0.0
    fault_end: float = 0.0
    end: float = 0.0
    post_checks: list[Callable[[StepRecord], None]] = field(default_factory=list)
    lag_recovery: list[float | None] = field(default_factory=list)
    allowed_codes: frozenset[str] = ALLOWED_CODES  # ranking statuses this fault may cause


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
        self._remaining: set[str] = set()  # faults still to come after the current one

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
                self._remaining = {f.name for f in self.cfg.faults[k:]}
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
            "events_sent": None if self.traffic is None else self.traffic.stats.__dict__,
        }
        return rep.write_report(self.out, self.results, meta, self.points)

    # ------------------------------------------------------------------------------ set-up

    def _bring_up(self) -> None:
        cfg = self.cfg
        self.say(f"starting Kafka (port {cfg.kafka_port}) and Redis (port {cfg.redis_port}) with infra/up.sh")
        self.infra.up()
        self._deprioritize_broker()
        self.infra.create_topics(cfg.bootstrap, {self.topic: 6, self.dlq: 6})
        if any(f.name.startswith("eventlog-") for f in cfg.faults):
            self.disk.mount()
        else:
            self.disk.path.mkdir(parents=True, exist_ok=True)
        if not self.disk.mounted and self.disk.why_not:
            self.say(
                f"event log on an ordinary folder ({self.disk.why_not}): the disk faults will be skipped"
            )
        self._start_consumers()  # they start up while the model trains
        self._model()
        self._start_servers()

        self.traffic = EventTraffic(
            cfg.bootstrap, self.topic, self.run_id, cfg.event_rate, cfg.dup_share, cfg.bad_share,
            priority=cfg.background_priority,
        )  # fmt: skip
        self.state = StreamState(cfg.redis_url, cfg.bootstrap, self.topic, self.group)
        self.letters = DeadLetters(cfg.bootstrap, self.dlq)
        self._start_generators()
        self.say("warming up: events and calls for a few seconds, until both consumers hold partitions")
        self.traffic.start()
        self._run_load(3.0, seed=0)
        self._wait_consumers_assigned(60.0)
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

    def _deprioritize_broker(self) -> None:
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
            port = free_port()
            args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--models", str(self.models),
                    "--redis", cfg.redis_url, "--metrics-port", "0", "--model-poll-interval-s", "1",
                    "--grace-period-s", "5"]  # fmt: skip
            service = Service(f"serve-{i}", args, self.logs / f"serve-{i}.log")
            service.start()
            self.servers.append(service)
            self.server_ports.append(port)
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

    def _wait_consumers_assigned(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(_last_assignment(c.log_text()) for c in self.consumers):
                return True
            time.sleep(0.5)
        self.say("warning: not both consumers hold partitions yet; continuing")
        return False

    # ------------------------------------------------------------------------------ one fault

    def _one_fault(self, spec: FaultSpec, seed: int) -> FaultResult:
        assert self.traffic is not None and self.state is not None
        result = FaultResult(spec.name, spec.title, spec.checks)
        inject = getattr(self, "_fault_" + spec.name.replace("-", "_"))
        skip = self._skip_reason(spec.name)
        if skip:
            result.skipped = skip
            return result
        window = _Window(spec, result)
        result.figures["load_avg"] = round(os.getloadavg()[0], 1)  # how busy the machine was
        self.traffic.start()
        joiner, records, window.start = self._run_load(spec.window_s, seed)
        if self.origin is None:
            self.origin = window.start
        _sleep_until(window.start + spec.pre_s)
        window.fault_start = time.monotonic()
        try:
            inject(window)
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
        for post in window.post_checks:
            post(record)
        self._stream_checks(window)
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
        if name.startswith("eventlog-") and not self.disk.mounted:
            return self.disk.why_not
        if name == "broker-restart" and "kafka" not in self._managed():
            return "the broker was not started by infra/ (no pid file), so it cannot be restarted"
        if name in ("redis-restart", "redis-lose-writes") and "redis" not in self._managed():
            return "Redis was not started by infra/ (no pid file), so it cannot be restarted"
        return ""

    def _managed(self) -> set[str]:
        return {s for s in ("kafka", "redis") if self.infra.running(s)}

    # ------------------------------------------------------------------------------ checks

    def _ranking_checks(self, w: _Window, record: StepRecord) -> None:
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

    def _stream_checks(self, w: _Window) -> None:
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
        from feature_store.online import read_features

        assert self.traffic is not None and self.state is not None
        users, items = expected_features(self.traffic.acked(), self.cfg.half_life_s)
        got_users: dict[str, Any] = {}
        got_items: dict[str, Any] = {}
        user_ids, item_ids = sorted(users), sorted(items)
        for i in range(0, max(len(user_ids), len(item_ids)), 500):
            u, it = user_ids[i : i + 500], item_ids[i : i + 500]
            read_u, read_i = _retry(lambda u=u, it=it: read_features(self.state.redis, u, it))  # type: ignore[union-attr]
            got_users.update(zip(u, read_u, strict=True))
            got_items.update(zip(it, read_i, strict=True))
        return compare(users, items, got_users, got_items)

    # ------------------------------------------------------------------------------ the faults

    def _fault_consumer_kill(self, w: _Window) -> None:
        victim = self.consumers[0]
        survivor_port = self.consumer_metrics[1]
        replayed = scrape(survivor_port, _REPLAYED) or 0.0
        applied = sum((self.state.applied() or {}).values())  # type: ignore[union-attr]
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        w.result.figures["killed_at_records"] = f"{applied:,}"
        victim.start()  # as a supervisor would, at once

        restarted = time.monotonic()

        def fenced(_record: StepRecord) -> None:
            # Applied but not yet committed when the kill landed: read again, stopped by the fence
            # (the restarted process counts from zero; its metrics may not be up yet).
            again = sum(scrape(port, _REPLAYED) or 0.0 for port in self.consumer_metrics) - replayed
            w.result.figures["re_read_and_fenced"] = max(0, int(again))
            if "consumer-hang" not in self._remaining:
                return  # no later fault needs the group whole again: no need to wait for the rejoin
            # Both consumers hold partitions again before the next fault (it needs two).
            joined = self._wait_consumers_assigned(120.0)
            w.result.check(
                "the restarted consumer rejoined the group",
                joined,
                f"holds partitions {time.monotonic() - restarted:.0f} s after its restart"
                if joined
                else "not yet",
            )

        w.post_checks.append(fenced)

    def _fault_consumer_hang(self, w: _Window) -> None:
        assert self.traffic is not None and self.state is not None
        victim = self.consumers[0]
        held = _last_assignment(victim.log_text())
        victim.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        w.result.check("the stopped consumer held partitions", held, "its last assignment was not empty")
        try:
            # Records published once the session has surely expired must be applied by the other one.
            _sleep_until(stopped + SESSION_TIMEOUT_MS / 1000 + 1.0)
            target = self.traffic.last_offsets()
            remaining = stopped + w.spec.hold_s - time.monotonic()
            took = self.state.wait_applied(target, max(remaining, 1.0))
            w.result.check(
                "the other consumer took every partition over while this one hung",
                took is not None,
                "applied everything published after the session timeout"
                if took is not None
                else f"records stayed unapplied for {w.spec.hold_s:.0f} s",
            )
            _sleep_until(stopped + w.spec.hold_s)
        finally:
            victim.signal(signal.SIGCONT)
        w.result.figures["stopped_s"] = round(time.monotonic() - stopped, 1)

    def _fault_broker_restart(self, w: _Window) -> None:
        started = time.monotonic()
        self.infra.restart("kafka")
        w.result.figures["restart_s"] = round(time.monotonic() - started, 1)
        self._deprioritize_broker()

    def _fault_redis_restart(self, w: _Window) -> None:
        started = time.monotonic()
        self.infra.restart("redis")
        w.result.figures["restart_s"] = round(time.monotonic() - started, 1)

    def _fault_redis_lose_writes(self, w: _Window) -> None:
        """Make Redis lose acknowledged writes for certain: the append-only file switched off (as
        an operator running without it would), a few seconds of writes, then SIGKILL and a restart
        that loads the AOF as it stood when it was switched off (``infra/redis.sh`` turns it on
        again). The loss is counted from the applied offsets just before the kill (writes paused,
        so none is acknowledged in between) and just after the restart."""
        import redis

        assert self.state is not None and self.traffic is not None
        pid = self.infra.pid("redis")
        if pid is None:
            raise RuntimeError("Redis has no live pid file: it was not started by infra/")
        rewinds0, rewound0 = self._scrape_sum(_REWINDS), self._scrape_sum(_REWOUND)
        twice0 = self._logged_twice()
        client = redis.Redis.from_url(self.cfg.redis_url, socket_timeout=5)
        try:
            client.config_set("appendonly", "no")
            time.sleep(max(0.5, w.spec.hold_s - 1.5))
            client.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")  # reads still answer
            before = _records(self.state.applied())
        finally:
            client.close()
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while Path(f"/proc/{pid}").exists() and time.monotonic() - killed < 10:
            time.sleep(0.05)
        self.infra.start("redis")
        w.result.figures["restart_s"] = round(time.monotonic() - killed, 1)
        applied = None
        while applied is None and time.monotonic() - killed < 60:
            applied = self.state.applied()  # None until the restarted Redis answers
            if applied is None:
                time.sleep(0.2)
        after = _records(applied)
        lost = before - after
        w.result.figures["writes_lost_records"] = lost
        w.result.check(
            "Redis lost acknowledged writes",
            lost > 0,
            f"applied offsets covered {before:,} records before the kill and {after:,} after the "
            f"restart: the writes of {lost:,} records were lost",
        )

        def applied_again(_record: StepRecord) -> None:
            assert self.state is not None and self.traffic is not None
            rewinds = self._scrape_sum(_REWINDS) - rewinds0
            rewound = self._scrape_sum(_REWOUND) - rewound0
            w.result.figures["rewound_records"] = int(rewound)
            w.result.check(
                "the consumers noticed the loss and read exactly the lost records again",
                rewinds > 0 and int(rewound) == lost,
                f"{rewinds:.0f} partitions rewound, {rewound:.0f} records read again ({lost} lost)",
            )
            caught_up = self.state.wait_logged(self.traffic.last_offsets(), 60.0)
            ids = self.disk.event_ids()
            distinct = self.traffic.distinct_events()
            missing = len(distinct - set(ids))
            twice = sum(1 for e in distinct if ids.get(e, 0) > 1) - twice0
            w.result.figures["logged_twice"] = twice
            w.result.check(
                "the event log holds every event, none logged twice by the rewind",
                caught_up is not None and missing == 0 and twice == 0,
                f"{len(distinct):,} distinct events, {missing} missing, {twice} more logged twice"
                + ("" if caught_up is not None else "; logged offsets did not catch up in 60 s"),
            )

        w.post_checks.append(applied_again)

    def _scrape_sum(self, metric: str) -> float:
        return sum(scrape(port, metric) or 0.0 for port in self.consumer_metrics)

    def _logged_twice(self) -> int:
        assert self.traffic is not None
        ids = self.disk.event_ids()
        return sum(1 for e in self.traffic.distinct_events() if ids.get(e, 0) > 1)

    def _fault_redis_slow(self, w: _Window) -> None:
        import redis

        client = redis.Redis.from_url(self.cfg.redis_url, socket_timeout=5)
        pauses = 0
        end = time.monotonic() + w.spec.hold_s
        try:
            while time.monotonic() < end:
                client.execute_command("CLIENT", "PAUSE", 50, "ALL")
                pauses += 1
                time.sleep(0.1)
        finally:
            client.close()
        w.result.figures["pauses"] = pauses

    def _restart_server(self, w: _Window, sig: int) -> Service:
        """Signal server 1, wait until it is gone (the other server carries the traffic), restart
        it as an orchestrator would and wait until it is SERVING again: the fault lasts until the
        service is whole again, so a start-up sharing the cores falls in the fault's figures and
        the recovery is counted from there."""
        victim, port = self.servers[0], self.server_ports[0]
        victim.signal(sig)
        w.fault_start = time.monotonic()
        code = victim.wait(15)
        w.result.figures["exit_s"] = round(time.monotonic() - w.fault_start, 2)
        if code is None:
            victim.signal(signal.SIGKILL)
            victim.wait(10)
        victim.start()
        restarted = time.monotonic()
        ok = wait_serving(port, SERVING_TIMEOUT_S)
        w.result.figures["restart_serving_s"] = round(time.monotonic() - restarted, 1)
        w.result.check("the restarted server is SERVING again", ok, f"port {port}")
        return victim

    def _fault_server_term(self, w: _Window) -> None:
        victim = self.servers[0]
        before = victim.log_text()
        self._restart_server(w, signal.SIGTERM)
        exited = w.fault_start + w.result.figures["exit_s"]

        def drained(record: StepRecord) -> None:
            # Calls sent from the SIGTERM until the server was gone: in flight on it, or refused
            # by it and sent to the other one. None may fail.
            stats = rep.window_stats(record, w.fault_start - 1.0, exited + 0.5)
            w.result.check(
                "no call failed while the server drained and stopped",
                not stats["errors"],
                f"{stats['calls']} calls from 1 s before the SIGTERM to its exit, "
                f"errors {stats['errors'] or 'none'}",
            )

        w.post_checks.append(drained)
        stopped = "ranking server stopped" in victim.log_text()[len(before) :]
        w.result.check(
            "stopped gracefully",
            stopped,
            "its log says 'ranking server stopped'" if stopped else "no clean stop logged",
        )

    def _fault_server_kill(self, w: _Window) -> None:
        w.allowed_codes = ALLOWED_CODES | {"UNAVAILABLE"}
        self._restart_server(w, signal.SIGKILL)
        killed = w.fault_start

        def in_flight_only(record: StepRecord) -> None:
            failed = (record.code == 14) & (record.scheduled >= w.start)  # UNAVAILABLE
            late = failed & (record.sent > killed + 1.0)
            served = rep.window_stats(record, killed, killed + 2.0)
            w.result.figures["unavailable"] = int(failed.sum())
            w.result.check(
                "UNAVAILABLE only for calls in flight at the kill (sent before it was seen, < 1 s)",
                int(late.sum()) == 0,
                f"{int(failed.sum())} UNAVAILABLE, "
                f"{int(late.sum())} of them sent more than 1 s after the kill",
            )
            w.result.check(
                "service continued on the other server",
                served["ok"] > 0,
                f"{served['ok']} of {served['calls']} calls answered in the 2 s after the kill",
            )

        w.post_checks.append(in_flight_only)

    def _fault_model_corrupt(self, w: _Window) -> None:
        from models.artifacts import (
            WEIGHTS_FP32,
            WEIGHTS_INT8,
            list_versions,
            new_version_name,
            write_manifest,
        )

        current = list_versions(self.models)[-1]
        bad: list[Path] = []
        for k, rewrite_manifest in enumerate((False, True), 1):
            name = new_version_name(time.time() + 60 * k)
            staging = self.models / f".tmp-{name}"
            shutil.copytree(current, staging)
            for weights in (WEIGHTS_INT8, WEIGHTS_FP32):
                data = bytearray((staging / weights).read_bytes())
                data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # flipped bytes mid-file
                if rewrite_manifest:
                    data = data[: len(data) // 3]  # and cut short: the checksum matches, the load fails
                (staging / weights).write_bytes(bytes(data))
            if rewrite_manifest:
                write_manifest(staging)
            staging.rename(self.models / name)  # published atomically, as training does
            bad.append(self.models / name)
        time.sleep(w.spec.hold_s)
        user, items = self.traffic.users[0], self.vocab[:20]  # type: ignore[union-attr]
        for service, port in zip(self.servers, self.server_ports, strict=True):
            version = _retry(lambda port=port: served_version(port, user, items))
            refused = [b.name for b in bad if f"model version {b.name} refused" in service.log_text()]
            w.result.check(
                f"{service.name} refused both and still serves {current.name}",
                version == current.name and len(refused) == len(bad),
                f"serves {version}; refused {refused or 'none'}",
            )
        for folder in bad:
            shutil.rmtree(folder, ignore_errors=True)

    def _fault_eventlog_full(self, w: _Window) -> None:
        self._disk_fault(w, "full")

    def _fault_eventlog_readonly(self, w: _Window) -> None:
        self._disk_fault(w, "read-only")

    def _disk_fault(self, w: _Window, kind: str) -> None:
        assert self.state is not None and self.traffic is not None
        failures_before = self._log_failures()
        log_sizes = [len(c.log_text()) for c in self.consumers]
        if kind == "full":
            w.result.figures["filled_mb"] = round(self.disk.fill() / 2**20)
        else:
            self.disk.read_only()
        try:
            time.sleep(LOG_ROLL_S + 1.0)  # a roll that began before the fault may still commit once
            committed_mid = self.state.committed()
            applied_mid = sum((self.state.applied() or {}).values())
            time.sleep(max(0.0, w.spec.hold_s - LOG_ROLL_S - 1.0))
            committed_end = self.state.committed()
            applied_end = sum((self.state.applied() or {}).values())
        finally:
            if kind == "full":
                self.disk.free()
            else:
                self.disk.read_write()
        w.result.check(
            "consumers stopped committing Kafka offsets",
            committed_mid is not None and committed_mid == committed_end,
            f"features kept flowing ({applied_end - applied_mid} more records applied); committed offsets "
            + (
                "unchanged" if committed_mid == committed_end else f"moved {committed_mid} -> {committed_end}"
            ),
        )
        failures = self._log_failures() - failures_before
        said = [
            line.strip()
            for c, size in zip(self.consumers, log_sizes, strict=True)
            for line in c.log_text()[size:].splitlines()
            if "event log: writing" in line
        ]
        w.result.check(
            "consumers said why (log and metrics)",
            bool(said) and failures > 0,
            f"{failures:.0f} failed rolls counted; log: "
            + (said[0][said[0].index("event log:") :][:220] if said else "nothing"),
        )

        def log_complete(_record: StepRecord) -> None:
            assert self.state is not None and self.traffic is not None
            caught_up = self.state.wait_logged(self.traffic.last_offsets(), 60.0)
            ids = self.disk.event_ids()
            distinct = self.traffic.distinct_events()
            missing = len(distinct - set(ids))
            twice = sum(1 for e in distinct if ids.get(e, 0) > 1)
            w.result.figures["logged_twice"] = twice
            w.result.check(
                "after the disk is back, the event log holds every event",
                caught_up is not None and missing == 0,
                f"{len(distinct):,} distinct events, {missing} missing, {twice} logged twice"
                + ("" if caught_up is not None else "; logged offsets did not catch up in 60 s"),
            )

        w.post_checks.append(log_complete)

    def _log_failures(self) -> float:
        return sum(
            scrape(port, "recstack_stream_eventlog_write_failures_total") or 0.0
            for port in self.consumer_metrics
        )

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
        for closer in (self.letters, self.state):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        self.disk.unmount()
        with contextlib.suppress(Exception):
            _delete_topics(self.cfg.bootstrap, [self.topic, self.dlq])
        self._restore_broker()
        self.infra.down()


# ---------------------------------------------------------------------------------- helpers


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _retry(call: Callable[[], Any], attempts: int = 20, delay_s: float = 0.5) -> Any:
    for i in range(attempts):
        try:
            return call()
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(delay_s)
    return None


def _records(applied: dict[int, int] | None) -> int:
    """Records the applied offsets cover (offset + 1 per partition)."""
    return sum(offset + 1 for offset in (applied or {}).values())


def _last_assignment(log_text: str) -> bool:
    """True when the newest process's last 'assigned partitions [...]' line lists any partition."""
    newest = log_text.rsplit("===== ", 1)[-1]  # Service.start marks each start in the log
    lines = [line for line in newest.splitlines() if "assigned partitions [" in line]
    return bool(lines) and not lines[-1].rstrip().endswith("[]")


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
