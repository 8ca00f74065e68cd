"""The pure parts of ``recstack chaos``: the truth, the comparison, the schedule, the figures, the report."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest

from feature_store.spec import EVENT_WEIGHTS, RECENT_ITEMS_MAX
from feature_store.values import ItemFeatures, UserFeatures, decay_merge
from loadtests.chaos import report as rep
from loadtests.chaos.report import FaultResult
from loadtests.chaos.schedule import FAULT_NAMES, parse_fault_list, plan
from loadtests.chaos.truth import Acked, compare, expected_features
from loadtests.stats import StepRecord
from recstack.errors import UserError
from recstack.events import Event

HALF_LIFE_S = 3600.0


def _ev(n: int, user: str = "u", item: str = "i", kind: str = "view", ts: int = 1_000) -> Event:
    return Event(event_id=f"e{n}", user_id=user, item_id=item, event_type=kind, ts_ms=ts)


# ------------------------------------------------------------------------------------------ truth


def test_truth_counts_each_distinct_event_once_in_offset_order():
    acked = [
        Acked(0, 2, _ev(3, item="b", ts=3_000)),
        Acked(0, 0, _ev(1, item="a", ts=1_000)),
        Acked(0, 1, _ev(2, item="b", kind="purchase", ts=2_000)),
        Acked(0, 3, _ev(1, item="a", ts=1_000)),  # a producer duplicate, later offset: no effect
    ]
    users, items = expected_features(acked, HALF_LIFE_S)
    u = users["u"]
    assert (u.views, u.add_to_carts, u.purchases) == (2, 0, 1)
    assert u.last_event_ts == 3_000
    assert u.recent_items == ["b", "a"]  # b again at offset 2 moves to the front, once
    assert (items["a"].views, items["b"].views, items["b"].purchases) == (1, 1, 1)
    assert items["b"].last_event_ts == 3_000


def test_truth_trending_matches_the_stream_merge_rule_in_any_time_order():
    times = [5_000, 1_000, 9_000, 3_000]
    acked = [Acked(0, k, _ev(k, item="x", kind="add_to_cart", ts=t)) for k, t in enumerate(times)]
    _, items = expected_features(acked, HALF_LIFE_S)
    score, ts = 0.0, 0
    for t in times:
        score, ts = decay_merge(score, ts, float(EVENT_WEIGHTS["add_to_cart"]), t, HALF_LIFE_S * 1000)
    assert items["x"].trending == pytest.approx(score, rel=1e-12)
    assert items["x"].last_event_ts == ts == 9_000


def test_truth_keeps_only_the_newest_recent_items():
    acked = [Acked(1, k, _ev(k, item=f"i{k}", ts=k)) for k in range(RECENT_ITEMS_MAX + 5)]
    users, _ = expected_features(acked, HALF_LIFE_S)
    recent = users["u"].recent_items
    assert len(recent) == RECENT_ITEMS_MAX and recent[0] == f"i{RECENT_ITEMS_MAX + 4}"


def test_compare_tells_lost_from_doubled_and_names_the_entities():
    users, items = expected_features([Acked(0, k, _ev(k, user=f"u{k % 2}")) for k in range(6)], HALF_LIFE_S)
    exact = compare(users, items, dict(users), dict(items))
    assert exact.ok and exact.events == 6 and exact.lost == exact.doubled == 0

    got_users = {
        "u0": UserFeatures(views=2, last_event_ts=1_000, recent_items=["i"]),  # one lost
        "u1": UserFeatures(views=4, last_event_ts=1_000, recent_items=["i"]),  # one applied twice
    }
    check = compare(users, items, got_users, dict(items))
    assert not check.ok and check.lost == 1 and check.doubled == 1
    assert check.mismatched_users == ["u0", "u1"] and not check.mismatched_items
    assert "1 lost, 1 applied twice" in check.summary()


def test_compare_counts_missing_entities_as_lost_and_checks_item_features():
    users, items = expected_features([Acked(0, 0, _ev(0))], HALF_LIFE_S)
    check = compare(
        users, items, {"u": None}, {"i": ItemFeatures(views=1, last_event_ts=1_000, trending=2.0)}
    )
    assert check.lost == 1 and check.mismatched_items == ["i"]  # trending 2.0, not 1.0


# --------------------------------------------------------------------------------------- schedule


def test_plan_keeps_the_canonical_order_and_refuses_unknown_faults():
    assert [f.name for f in plan()] == list(FAULT_NAMES)
    chosen = plan(["redis-restart", "consumer-kill", "redis-restart"])
    assert [f.name for f in chosen] == ["consumer-kill", "redis-restart"]
    with pytest.raises(UserError, match="--faults: unknown fault.*disk-melt"):
        plan(["disk-melt"])


def test_quick_plan_is_shorter_and_every_window_holds_its_fault():
    full, quick = plan(), plan(quick=True)
    assert sum(f.window_s for f in quick) < sum(f.window_s for f in full)
    for f in full + quick:
        assert f.window_s == f.pre_s + f.hold_s + f.post_s and f.pre_s > 0 and f.post_s > 0
    assert sum(f.window_s for f in full) < 8 * 60  # the default run stays within the budget


def test_redis_lose_writes_is_a_redis_fault_checked_against_the_truth_and_the_event_log(tmp_path):
    from loadtests.chaos.faults.base import records_covered as _records
    from loadtests.chaos.runner import ChaosConfig, ChaosRun

    names = list(FAULT_NAMES)
    assert names.index("redis-restart") < names.index("redis-lose-writes") < names.index("redis-slow")
    (spec,) = plan(["redis-lose-writes"])
    assert "AOF switched off" in spec.title and "SIGKILL" in spec.title
    assert "features = truth" in spec.checks and "event log exactly once" in spec.checks
    assert spec.hold_s >= 2  # seconds of acknowledged writes that only the memory holds
    (quick,) = plan(["redis-lose-writes"], quick=True)
    assert quick.hold_s == spec.hold_s and quick.window_s < spec.window_s
    # the writes lost are counted from the applied offsets (offset + 1 records per partition)
    assert _records({0: 9, 1: 0}) == 11 and _records({}) == _records(None) == 0
    # like redis-restart, it needs a Redis that infra/ started (it kills and starts it)
    run = ChaosRun(ChaosConfig(out=tmp_path, faults=[spec]))
    run._managed = lambda: {"kafka"}  # type: ignore[method-assign]
    assert "Redis was not started by infra/" in run._skip_reason("redis-lose-writes")
    run._managed = lambda: {"kafka", "redis"}  # type: ignore[method-assign]
    assert run._skip_reason("redis-lose-writes") == ""


def test_an_unknown_fault_is_refused_with_every_known_one_listed():
    with pytest.raises(UserError) as refused:
        plan(["consumer-kill", "disk-melt"])
    message = str(refused.value)
    assert "unknown fault(s) disk-melt; known: " + ", ".join(FAULT_NAMES) in message


# --------------------------------------------------------------------------------------- registry

REPO_ROOT = Path(__file__).resolve().parents[2]


def _faults_the_docs_name() -> list[str]:
    """The faults of docs/RELIABILITY.md's table, one row each, in the run's order."""
    text = (REPO_ROOT / "docs" / "RELIABILITY.md").read_text()
    return re.findall(r"^\| `([a-z0-9-]+)`: ", text, flags=re.MULTILINE)


def test_the_registry_holds_exactly_the_faults_the_docs_name_each_with_its_spec_and_code():
    from loadtests.chaos import faults
    from loadtests.chaos.faults.base import NEEDS, Fault, FaultSpec

    documented = _faults_the_docs_name()
    assert len(documented) == 12 and len(set(documented)) == 12
    registered = faults.registered()
    assert [f.spec.name for f in registered] == documented == list(FAULT_NAMES)
    assert len({f.order for f in registered}) == len(registered)
    for fault in registered:
        spec = fault.spec
        assert isinstance(spec, FaultSpec) and spec.title and spec.checks and spec.hold_s > 0, spec
        assert faults.get(spec.name) is fault
        # the code lives in the registry's package, in the same module as the spec
        assert fault.__module__.startswith("loadtests.chaos.faults."), fault
        assert fault.inject is not Fault.inject, spec.name
        assert inspect.getsourcefile(fault.inject) == inspect.getsourcefile(fault), spec.name
        if fault.check is not Fault.check:
            assert inspect.getsourcefile(fault.check) == inspect.getsourcefile(fault), spec.name
        assert set(fault.needs) <= set(NEEDS), spec.name
    with pytest.raises(
        KeyError, match="unknown fault 'disk-melt'; known: consumer-kill, attribution-kill, consumer-hang"
    ):
        faults.get("disk-melt")


def test_register_refuses_a_fault_without_code_or_with_a_taken_name():
    from loadtests.chaos import faults
    from loadtests.chaos.faults.base import Fault, FaultSpec

    class NoCode(Fault):
        spec = FaultSpec("no-code", "nothing", "nothing", hold_s=1.0)
        order = 1_000

    with pytest.raises(TypeError, match="needs an `inject` method"):
        faults.register(NoCode)

    class Again(Fault):
        spec = FaultSpec("consumer-kill", "again", "again", hold_s=1.0)
        order = 1_001

        def inject(self) -> None:
            pass

    with pytest.raises(ValueError, match="fault consumer-kill registered twice"):
        faults.register(Again)
    assert "no-code" not in faults.names() and faults.get("consumer-kill") is not Again


def test_adding_a_fault_is_adding_a_module(tmp_path, monkeypatch):
    import sys

    from loadtests.chaos import faults
    from loadtests.chaos.runner import ChaosConfig, ChaosRun

    (tmp_path / "disk_slow.py").write_text(
        "from loadtests.chaos.faults import register\n"
        "from loadtests.chaos.faults.base import Fault, FaultSpec\n\n\n"
        "@register\n"
        "class DiskSlow(Fault):\n"
        '    spec = FaultSpec("disk-slow", "event-log disk slowed", "event log complete", hold_s=3.0)\n'
        "    order = 55  # between redis-lose-writes and redis-slow\n"
        '    needs = ("disk",)\n\n'
        "    def inject(self) -> None:\n"
        "        pass\n"
    )
    monkeypatch.setattr(faults, "__path__", [*faults.__path__, str(tmp_path)])
    monkeypatch.setattr(faults, "_REGISTRY", dict(faults._REGISTRY))  # restored afterwards
    monkeypatch.setattr(faults, "_loaded", False)
    try:
        names = list(faults.names())
        assert (
            names.index("redis-lose-writes") + 1 == names.index("disk-slow") == names.index("redis-slow") - 1
        )
        (spec,) = plan(parse_fault_list("disk-slow"), quick=True)
        assert spec.hold_s == 3.0 and spec.window_s == 11.0
        run = ChaosRun(ChaosConfig(out=tmp_path / "out", faults=[spec]))
        assert run._skip_reason("disk-slow") == run.disk.why_not  # not mounted: skipped, saying why
    finally:
        sys.modules.pop("loadtests.chaos.faults.disk_slow", None)


def test_parse_fault_list():
    assert parse_fault_list("all") == [] and parse_fault_list("") == []
    assert parse_fault_list(" consumer-kill, redis-slow ,") == ["consumer-kill", "redis-slow"]


# ---------------------------------------------------------------------------------------- figures


def _record(
    latencies_ms: list[float], codes: list[int], start: float = 100.0, rate: float = 10.0
) -> StepRecord:
    n = len(latencies_ms)
    scheduled = start + np.arange(n) / rate
    done = scheduled + np.asarray(latencies_ms) / 1000.0
    return StepRecord(
        scheduled=scheduled,
        sent=scheduled.copy(),
        done=done,
        code=np.asarray(codes, dtype=np.int16),
        path=np.zeros(n, dtype=np.int16),
        degraded=np.zeros(n, dtype=bool),
        path_names=["light"],
    )


def test_window_stats_and_recovery_time():
    # 10 calls/s: 2 s fine (5 ms), 2 s slow with UNAVAILABLE errors, then fine again
    lat = [5.0] * 20 + [50.0] * 20 + [5.0] * 20
    codes = [0] * 20 + [14, 0] * 10 + [0] * 20
    record = _record(lat, codes)
    during = rep.window_stats(record, 102.0, 104.0)
    assert during["calls"] == 20 and during["errors"] == {"UNAVAILABLE": 10} and during["p99_ms"] == 50.0
    assert rep.window_stats(record, 100.0, 102.0)["p99_ms"] == 5.0
    assert rep.recovery_s(record, healed=103.0, end=106.0) == 1.0  # the first clean second starts at 104
    assert rep.recovery_s(record, healed=102.0, end=104.0) is None
    points = rep.timeline(record, origin=100.0)
    assert [p["t"] for p in points] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert points[2]["error_rate"] == 0.5 and points[4]["p99_ms"] == 5.0


def test_report_table_json_and_plot(tmp_path):
    good = FaultResult("consumer-kill", "consumer SIGKILLed", "features = truth")
    good.check("features = truth", True, "100 events, 0 lost, 0 applied twice")
    good.figures.update(
        {"p99_ms": {"before": 4.0, "during": 30.0, "after": 5.0}, "errors": {}, "recovery_p99_s": 1.5}
    )
    good.times = {"start": 0.0, "fault_start": 2.0, "fault_end": 3.0, "end": 8.0}
    bad = FaultResult("server-kill", "server SIGKILLed", "only UNAVAILABLE")
    bad.check("ranking errors only UNAVAILABLE", False, "INTERNAL 3")
    bad.figures["errors"] = {"INTERNAL": 3}
    skipped = FaultResult("eventlog-full", "disk full", "log complete", skipped="needs root")
    points = [{"t": float(t), "p50_ms": 2.0, "p99_ms": 5.0 + t, "error_rate": 0.0} for t in range(8)]
    paths = rep.write_report(tmp_path, [good, bad, skipped], {"command": "recstack chaos --quick"}, points)

    text = paths["markdown"].read_text()
    assert "| fault | what was checked | result | figures |" in text
    assert "**1 of 3 faults passed every check.**" in text
    assert (
        "| `consumer-kill`: consumer SIGKILLed | features = truth | **pass** | p99 4.0 / 30.0 / 5.0 ms"
        in text
    )
    assert "**FAIL**: ranking errors only UNAVAILABLE" in text and "errors INTERNAL 3" in text
    assert "skipped: needs root" in text
    data = json.loads(paths["json"].read_text())
    assert data["passed"] is False
    assert [f["ok"] for f in data["faults"]] == [True, False, False]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ priorities


def _thread_priorities(pid: int) -> dict[int, tuple[int, int]]:
    import os

    return {
        int(t): (os.sched_getscheduler(int(t)), os.getpriority(os.PRIO_PROCESS, int(t)))
        for t in os.listdir(f"/proc/{pid}/task")
    }


@pytest.mark.parametrize(("priority", "expected"), [("idle", "SCHED_IDLE"), ("low", 10)])
def test_set_priority_reaches_every_thread_of_a_running_process(priority, expected):
    import os
    import subprocess
    import sys

    from loadtests.chaos.stack import set_priority

    # A process with a few threads already running, like a started JVM.
    code = (
        "import threading, time\n"
        "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert set(_thread_priorities(proc.pid).values()) == {(os.SCHED_OTHER, 0)}
        assert set_priority(proc.pid, priority) == 4
        after = set(_thread_priorities(proc.pid).values())
        assert after == ({(os.SCHED_IDLE, 0)} if expected == "SCHED_IDLE" else {(os.SCHED_OTHER, expected)})
        assert set_priority(proc.pid, "normal") == 4  # as it was (this test runs as root)
        assert set(_thread_priorities(proc.pid).values()) == {(os.SCHED_OTHER, 0)}
    finally:
        proc.kill()
        proc.wait(10)
    assert set_priority(proc.pid, priority) == 0  # gone: nothing to change, no error


def test_a_service_runs_at_its_priority(tmp_path, monkeypatch):
    import os
    import sys

    from loadtests.chaos import stack

    # The service's own command replaced by one that reports the priority it runs at.
    report = "import os; print('policy', os.sched_getscheduler(0), 'niceness', os.nice(0))"
    monkeypatch.setattr(stack, "RECSTACK", [sys.executable, "-c", report])
    for priority, policy, niceness in (
        ("normal", os.SCHED_OTHER, 0),
        ("low", os.SCHED_OTHER, stack.LOW_NICENESS),
        ("idle", os.SCHED_IDLE, 0),
    ):
        service = stack.Service(f"probe-{priority}", [], tmp_path / f"{priority}.log", priority=priority)
        service.start()
        assert service.wait(60) == 0
        assert f"policy {policy} niceness {niceness}" in service.log_text()


def test_a_build_thread_passes_its_priority_to_the_threads_it_starts():
    import os
    import threading

    from loadtests.chaos.traffic import on_thread_at

    def start_worker() -> threading.Thread:
        # like KafkaProducer's constructor: starts its I/O thread and returns
        ready, done = threading.Event(), threading.Event()
        worker = threading.Thread(target=lambda: (ready.set(), done.wait(10)), daemon=True)
        worker.start()
        ready.wait(10)
        worker.done = done  # type: ignore[attr-defined]
        return worker

    worker = on_thread_at("idle", start_worker)
    try:
        assert os.sched_getscheduler(worker.native_id) == os.SCHED_IDLE
        assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER  # the caller keeps its own
    finally:
        worker.done.set()  # type: ignore[attr-defined]
        worker.join(10)


def test_the_experiment_arm_copy_sorts_before_the_run_model_and_labelled_metrics_are_summed(monkeypatch):
    import io

    from loadtests.chaos import experiment
    from models.artifacts import _VERSION_RE

    assert experiment.older_name("v20240101-000000") == "v20231231-235959"
    assert experiment.older_name("v20261207-031500-2") == "v20261207-031459"
    assert _VERSION_RE.match(experiment.older_name("v20240101-000000"))
    assert experiment.older_name("v20240101-000000") < "v20240101-000000"

    text = (
        "# HELP recstack_ranking_path_total x\n"
        'recstack_ranking_path_total{path="light"} 3.0\n'
        'recstack_ranking_path_total{path="full"} 4.0\n'
        "recstack_ranking_path_totals 100.0\n"
        "recstack_impressions_failed_total 2.0\n"
    )
    monkeypatch.setattr(experiment.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(text.encode()))
    assert experiment.scrape_total(1, "recstack_ranking_path_total") == 7.0
    assert experiment.scrape_total(1, "recstack_impressions_failed_total") == 2.0
    assert experiment.scrape_total(1, "recstack_impressions_dropped_total") == 0.0

    def refused(*a, **k):
        raise OSError("connection refused")

    monkeypatch.setattr(experiment.urllib.request, "urlopen", refused)
    assert experiment.scrape_total(1, "recstack_ranking_path_total") is None
