"""Serving side of experiments, in process: the experiment state's checks, the CLI's arm syntax,
per-version forward passes, shadow work only with spare capacity, and the impression buffer that
never makes a call wait. The real server, Redis and Kafka are in
tests/integration/test_experiments_serving.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from recstack.errors import UserError
from recstack.experiments.assign import Arm, InvalidExperiment
from recstack.experiments.cli import parse_arm
from recstack.experiments.state import Experiment, decode, new_experiment
from services.ranking.batcher import MicroBatcher
from services.ranking.engine import BatchResults, _forward_by_version
from services.ranking.impressions import ImpressionPublisher, impression_json
from services.ranking.metrics import RankingMetrics


# --------------------------------------------------------------------------- state and CLI syntax
def test_state_round_trips_and_refuses_what_assign_refuses():
    exp = new_experiment("ab", [Arm("A", "v1", 0.5), Arm("B", "v2", 0.5), Arm("C", "v3", shadow=True)])
    back = decode(json.dumps(exp.to_dict()))
    assert back == exp and back.salt == "ab" and back.shadow == Arm("C", "v3", 0.0, True)
    assert back.assignment.arm_for("u1") == exp.assignment.arm_for("u1")
    bad = exp.to_dict()
    bad["arms"][1]["share"] = 0.4
    with pytest.raises(InvalidExperiment, match="arms.share: .*sum to 1"):
        decode(json.dumps(bad))
    missing = exp.to_dict()
    del missing["salt"]
    with pytest.raises(InvalidExperiment, match="'salt' is missing"):
        decode(json.dumps(missing))
    with pytest.raises(InvalidExperiment, match="not JSON"):
        decode(b"{")
    with pytest.raises(InvalidExperiment, match="at most one shadow"):
        new_experiment("x", [Arm("A", "v1", 1.0), Arm("S", "v2", shadow=True), Arm("T", "v3", shadow=True)])
    with pytest.raises(InvalidExperiment, match="name"):
        Experiment(name=" ", salt="s", arms=(Arm("A", "v1", 1.0),))


def test_arm_syntax_errors_name_the_argument():
    assert parse_arm("A=v20240101-000000:0.25") == Arm("A", "v20240101-000000", 0.25)
    assert parse_arm("B=v2:50%") == Arm("B", "v2", 0.5)
    assert parse_arm("C=v3", shadow=True) == Arm("C", "v3", 0.0, True)
    for text, why in (
        ("A", "expected NAME=VERSION:SHARE"),
        ("A=v1", "the traffic share is missing"),
        ("A=v1:half", "share 'half' is not a number"),
        ("A=v1:1.5", r"share must be in \(0, 1\]"),
    ):
        with pytest.raises(UserError, match=f"--arm '{text}': {why}"):
            parse_arm(text)
    with pytest.raises(UserError, match="--shadow 'C=v3:0.1': a shadow arm takes no traffic"):
        parse_arm("C=v3:0.1", shadow=True)


# --------------------------------------------------------------------------- one pass per version
class _Ranker:
    def __init__(self, version: str, offset: float) -> None:
        self.version, self.offset, self.calls = version, offset, []

    def rank_batch(self, inputs, load=0.0):
        self.calls.append(len(inputs))
        return [SimpleNamespace(scores=np.array([x + self.offset]), path="full") for x in inputs]


def test_a_mixed_batch_runs_one_forward_pass_per_version_in_request_order():
    a, b = _Ranker("va", 0.0), _Ranker("vb", 100.0)
    outputs = _forward_by_version([a, b, a, b, a], [0, 1, 2, 3, 4], load=0.0)
    assert [float(o.scores[0]) for o in outputs] == [0, 101, 2, 103, 4]
    assert a.calls == [3] and b.calls == [2]
    _forward_by_version([a, a], [0, 1], load=0.0)
    assert a.calls == [3, 2]  # a single version: one pass over the batch as it is


# --------------------------------------------------------------------------- shadow: spare capacity only
def test_follow_up_work_runs_with_spare_capacity_and_is_dropped_while_calls_wait():
    spare_seen: list[bool] = []
    hold = threading.Event()
    hold.set()

    def compute(items, load):
        assert hold.wait(30)
        results = BatchResults(f"r-{x}" for x in items)
        results.followup = spare_seen.append
        return results

    async def main():
        metrics = RankingMetrics()
        batcher = MicroBatcher(compute, ThreadPoolExecutor(1), metrics=metrics, max_queue_delay_s=0.0)
        await batcher.start()
        assert await batcher.submit("a", 1) == "r-a"  # idle: the follow-up has spare capacity
        await asyncio.sleep(0.05)
        assert spare_seen == [True]
        hold.clear()  # the next batch blocks in its worker while more calls queue behind it
        first = asyncio.ensure_future(batcher.submit("b", 1))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.submit(x, 1)) for x in "cd"]
        await asyncio.sleep(0.05)
        hold.set()
        assert await first in ("r-b",)
        assert [await q for q in queued] == ["r-c", "r-d"]
        await batcher.stop()
        # b's follow-up found c and d waiting: dropped (False); the last batch's had spare capacity.
        assert spare_seen[1] is False and spare_seen[-1] is True

    asyncio.run(main())


def test_a_running_follow_up_neither_delays_the_next_call_nor_runs_twice_at_once():
    release = threading.Event()
    started: list[str] = []
    spare_seen: list[tuple[str, bool]] = []

    def compute(items, load):
        results = BatchResults(f"r-{x}" for x in items)

        def followup(spare, batch=tuple(items)):
            spare_seen.append((batch[0], spare))
            if spare:
                started.append(batch[0])
                assert release.wait(30)  # a slow shadow pass

        results.followup = followup
        return results

    async def main():
        batcher = MicroBatcher(
            compute, ThreadPoolExecutor(1), metrics=RankingMetrics(), max_queue_delay_s=0.0,
            inline_when_idle=True, followup_executor=ThreadPoolExecutor(1),
        )  # fmt: skip
        await batcher.start()
        assert await batcher.submit("a", 1) == "r-a"
        for _ in range(100):
            if started:
                break
            await asyncio.sleep(0.01)
        assert started == ["a"]  # a's follow-up is running, and blocked
        # The next calls are answered while it runs (before: they waited behind it).
        assert await asyncio.wait_for(batcher.submit("b", 1), 5) == "r-b"
        assert await asyncio.wait_for(batcher.submit("c", 1), 5) == "r-c"
        release.set()
        await batcher.stop()
        # One follow-up at a time: b's and c's came while a's ran, and were dropped.
        assert spare_seen[0] == ("a", True)
        assert ("b", False) in spare_seen and ("c", False) in spare_seen and started == ["a"]

    asyncio.run(main())


# --------------------------------------------------------------------------- impressions
class _FakeProducer:
    """confluent-kafka's producer interface: ``produce`` queues up to ``capacity`` records (then
    raises BufferError, as librdkafka does), ``poll`` reports the queued ones delivered when the
    broker is ``up`` (failed when ``refuse`` says so), ``flush`` returns how many remain queued."""

    def __init__(self, capacity: int = 1_000_000, up: bool = True, refuse=lambda value: False) -> None:
        self.capacity, self.up, self.refuse = capacity, up, refuse
        self.queued: list = []
        self.times_out_in_flush = False
        self.sent: list[tuple[bytes, bytes]] = []

    def produce(self, topic, value, key, on_delivery):
        if len(self.queued) >= self.capacity:
            raise BufferError("Local: Queue full")
        self.queued.append((value, key, on_delivery))

    def poll(self, timeout=0):
        if not self.up:
            return 0
        queued, self.queued = self.queued, []
        for value, key, callback in queued:
            if self.refuse(value):
                callback("KafkaError{code=MSG_SIZE_TOO_LARGE}", None)
            else:
                self.sent.append((key, value))
                callback(None, None)
        return len(queued)

    def flush(self, timeout=None):
        self.poll()
        if self.times_out_in_flush:  # message.timeout.ms passes during flush: reported failed
            queued, self.queued = self.queued[:-3], self.queued[-3:]
            for _, _, callback in queued:
                callback("KafkaError{code=_MSG_TIMED_OUT}", None)
        return len(self.queued)


def _shown(k: int, experiment: str = "ab") -> tuple:
    return (f"{k:032x}", f"user-{k}", "A", "v1", ["i1", "i2"], 1_700_000_000_000, experiment)


def test_a_full_buffer_drops_and_counts_without_delaying_the_caller():
    metrics = RankingMetrics()
    connected = threading.Event()

    def factory():
        connected.wait(30)  # the sender thread is stuck creating its producer
        return _FakeProducer()

    publisher = ImpressionPublisher(factory, "t", max_buffer=100, metrics=metrics, close_timeout_s=0.1)
    publisher.start()
    start = time.perf_counter()
    for k in range(50):
        publisher.offer_many([_shown(2 * k), _shown(2 * k + 1), _shown(-1)])  # 150 offered
    elapsed = time.perf_counter() - start
    assert publisher.buffered == 100
    assert metrics.value("recstack_impressions_dropped_total") == 50
    assert elapsed < 0.5  # 50 calls: no call waited on the stuck producer (each is microseconds)
    connected.set()
    deadline = time.monotonic() + 10
    while publisher.buffered and time.monotonic() < deadline:
        time.sleep(0.01)
    assert publisher.buffered == 0  # the sender drained the buffer once it had a producer
    publisher.stop()


def test_impressions_without_a_producer_at_shutdown_are_counted_not_lost():
    metrics = RankingMetrics()

    def factory():
        raise OSError("no broker")

    publisher = ImpressionPublisher(factory, "t", max_buffer=10, metrics=metrics, close_timeout_s=0.1)
    publisher.start()
    publisher.offer_many(_shown(k) for k in range(12))
    publisher.stop()
    assert metrics.value("recstack_impressions_dropped_total") == 2
    assert metrics.value("recstack_impressions_failed_total") == 10


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_every_offered_impression_is_published_dropped_or_failed_exactly_once():
    metrics = RankingMetrics()
    producer = _FakeProducer(refuse=lambda value: b'"user-7"' in value)
    publisher = ImpressionPublisher(lambda: producer, "t", max_buffer=100, linger_ms=1, metrics=metrics)
    publisher.start()
    publisher.offer_many(_shown(k) for k in range(40))
    _wait_for(lambda: metrics.value("recstack_impressions_published_total") == 39)
    publisher.stop()
    assert metrics.value("recstack_impressions_published_total") == 39
    assert metrics.value("recstack_impressions_failed_total") == 1  # the refused record
    assert metrics.value("recstack_impressions_dropped_total") == 0
    # Keyed by user, the record's JSON as written, in the order offered.
    assert [key for key, _ in producer.sent][:3] == [b"user-0", b"user-1", b"user-2"]
    assert json.loads(producer.sent[0][1])["request_id"] == f"{0:032x}"


def test_a_broker_away_fills_the_producer_then_the_buffer_and_drops_count_the_rest():
    metrics = RankingMetrics()
    producer = _FakeProducer(capacity=30, up=False)
    publisher = ImpressionPublisher(lambda: producer, "t", max_buffer=50, linger_ms=1, metrics=metrics)
    publisher.start()
    publisher.offer_many(_shown(k) for k in range(30))
    _wait_for(lambda: len(producer.queued) == 30 and publisher.buffered == 0)
    publisher.offer_many(_shown(k) for k in range(30, 100))  # the producer is full: 50 wait, 20 drop
    time.sleep(0.05)
    assert (len(producer.queued), publisher.buffered) == (30, 50)
    assert metrics.value("recstack_impressions_dropped_total") == 20
    producer.up = True  # the broker is back: everything held goes out, in order
    _wait_for(lambda: metrics.value("recstack_impressions_published_total") == 80)
    publisher.stop()
    assert metrics.value("recstack_impressions_published_total") == 80
    assert [json.loads(v)["request_id"] for _, v in producer.sent] == [f"{k:032x}" for k in range(80)]
    assert metrics.value("recstack_impressions_failed_total") == 0


def test_records_the_broker_never_acknowledged_by_shutdown_count_as_failed():
    metrics = RankingMetrics()
    producer = _FakeProducer(up=False)
    publisher = ImpressionPublisher(
        lambda: producer, "t", max_buffer=100, linger_ms=1, metrics=metrics, close_timeout_s=0.1
    )
    publisher.start()
    publisher.offer_many(_shown(k) for k in range(25))
    _wait_for(lambda: len(producer.queued) == 25)
    producer.times_out_in_flush = True  # 22 reported failed inside flush, 3 still queued after it
    publisher.stop()
    assert metrics.value("recstack_impressions_failed_total") == 25
    assert metrics.value("recstack_impressions_published_total") == 0


def test_librdkafka_security_properties():
    from recstack.kafka import KafkaSecurity
    from services.ranking.impressions import librdkafka_security

    assert librdkafka_security(KafkaSecurity()) == {"security.protocol": "plaintext"}
    sasl = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", "u", "p")
    assert librdkafka_security(sasl) == {
        "security.protocol": "sasl_plaintext",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "u",
        "sasl.password": "p",
    }
    ca = Path(__file__)  # any existing file stands for the CA bundle
    tls = KafkaSecurity("SSL", ssl_cafile=str(ca))
    assert librdkafka_security(tls) == {"security.protocol": "ssl", "ssl.ca.location": str(ca)}


def test_the_impressions_producer_is_librdkafkas_idempotent_one():
    from recstack.kafka import KafkaSecurity
    from services.ranking.impressions import kafka_producer_factory

    # librdkafka checks the configuration when the producer is made; no broker needed for that.
    producer = kafka_producer_factory("127.0.0.1:1", KafkaSecurity(), 5, max_buffer=7)()
    try:
        for _ in range(7):
            producer.produce("t", b"{}", b"k")
        with pytest.raises(BufferError):  # max_buffer bounds librdkafka's own queue
            producer.produce("t", b"{}", b"k")
    finally:
        producer.purge()  # nothing left queued for the unreachable broker


def test_impression_record_schema():
    record = json.loads(impression_json((*_shown(7), ("v2", ["i2", "i1"]))))
    assert record == {
        "request_id": f"{7:032x}",
        "user_id": "user-7",
        "experiment": "ab",
        "arm": "A",
        "model_version": "v1",
        "items": [{"item_id": "i1", "position": 1}, {"item_id": "i2", "position": 2}],
        "ts": 1_700_000_000_000,
        "shadow": {
            "version": "v2",
            "items": [{"item_id": "i2", "position": 1}, {"item_id": "i1", "position": 2}],
        },
    }
    assert "shadow" not in json.loads(impression_json(_shown(1)))
    # Without an experiment (arm ""), no experiment field: the attribution consumer counts such
    # impressions under the experiment "default".
    plain = json.loads(impression_json(("r1", "u1", "", "v1", ["i1"], 1_700_000_000_000, "")))
    assert "experiment" not in plain and plain["arm"] == ""


def test_the_attribution_rule_reads_the_servers_impressions_as_written():
    """The server writes 1-based positions; the attribution rule must read the same numbers: the
    first item shown has reciprocal rank 1 (a rule reading them as 0-based would give 1/2)."""
    from recstack.events import Event
    from services.attribution.rule import event_credits, parse_impression

    imp = parse_impression(impression_json((*_shown(7), ("v2", ["i2", "i1"]))))
    assert imp.items == {"i1": 1, "i2": 2} and imp.shadow_items == {"i2": 1, "i1": 2}
    event = Event(
        event_id="e1", user_id="user-7", item_id="i1", event_type="purchase", ts_ms=1_700_000_000_001
    )
    credits = {(arm, name): value for _, arm, _, name, value in event_credits(event, imp)}
    assert credits[("A", "rr_micros_purchase")] == 1_000_000
    assert credits[("shadow:v2", "rr_micros_purchase")] == 500_000


def test_serve_takes_the_impression_flags_and_the_kafka_security_group(monkeypatch):
    import argparse

    from recstack.cli import build_parser
    from services.ranking.cli import config_from_args

    def serve_parser() -> argparse.ArgumentParser:
        action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices["serve"]

    config = config_from_args(serve_parser().parse_args([]))
    assert config.kafka_bootstrap is None and config.experiments  # impressions off by default
    monkeypatch.setenv("RECSTACK_KAFKA_SASL_PASSWORD", "s3cret-value")  # read when the parser is built
    serve = serve_parser()
    argv = [
        *("--kafka-bootstrap", "k1:9093,k2:9093", "--impressions-topic", "imp", "--impressions-buffer", "50"),
        *("--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-mechanism", "SCRAM-SHA-512"),
        *("--kafka-sasl-username", "ranking", "--experiments", "off"),
    ]
    config = config_from_args(serve.parse_args(argv))
    assert (config.kafka_bootstrap, config.impressions_topic, config.impressions_buffer) == (
        "k1:9093,k2:9093",
        "imp",
        50,
    )
    assert config.kafka_security.client_options()["sasl_plain_password"] == "s3cret-value"
    assert not config.experiments and "s3cret-value" not in repr(config)
    with pytest.raises(UserError, match="--kafka-sasl-mechanism"):
        config_from_args(serve.parse_args(["--kafka-security-protocol", "SASL_SSL"]))


# --------------------------------------------------------------------------- the watcher's polls
def test_the_experiment_watcher_keeps_its_routing_through_redis_errors_and_bad_states(tmp_path):
    from services.ranking.experiments import ExperimentWatcher
    from services.ranking.lifecycle import ModelSlot

    class Client:
        value: bytes | None = None
        down = False

        def get(self, key):
            if self.down:
                raise ConnectionError("Redis is down")
            return self.value

    for name in ("v1", "v2", "bad"):
        (tmp_path / name).mkdir()
    loads: list[str] = []

    def load(folder):
        loads.append(folder.name)
        if folder.name == "bad":
            raise ValueError("checksum mismatch")
        return SimpleNamespace(version=folder.name)

    client, metrics = Client(), RankingMetrics()
    default = SimpleNamespace(version="v0")
    watcher = ExperimentWatcher(
        lambda: client,
        tmp_path,
        ModelSlot(default),
        load=load,
        list_versions=lambda root: sorted(p for p in root.iterdir() if p.is_dir()),
        metrics=metrics,
    )

    async def main():
        assert not await watcher.check_now() and watcher.current is None  # nothing stored
        exp = new_experiment("e", [Arm("A", "v1", 0.5), Arm("B", "bad", 0.5), Arm("C", "v2", shadow=True)])
        client.value = json.dumps(exp.to_dict()).encode()
        assert await watcher.check_now()
        routing = watcher.current
        users = [SimpleNamespace(user_id=f"u{k}") for k in range(200)]
        arms, rankers = routing.route(users, default)
        for arm, ranker in zip(arms, rankers, strict=True):
            assert ranker.version == {"A": "v1", "B": "v0"}[arm]  # B's version refused: the default
        assert set(arms) == {"A", "B"} and routing.shadow.version == "v2"
        assert metrics.value("recstack_experiment_version_refusals_total") == 1
        assert not await watcher.check_now() and loads == ["v1", "bad", "v2"]  # unchanged: no reload
        assert metrics.value("recstack_experiment_version_refusals_total") == 1
        exp2 = new_experiment("f", [Arm("A", "v1", 0.5), Arm("B", "v3", 0.5)])  # v3 not published yet
        client.value = json.dumps(exp2.to_dict()).encode()
        assert await watcher.check_now()
        assert {r.version for r in watcher.current.route(users, default)[1]} == {"v1", "v0"}
        assert not await watcher.check_now()
        (tmp_path / "v3").mkdir()  # published: picked up without a new state
        assert await watcher.check_now()
        assert {r.version for r in watcher.current.route(users, default)[1]} == {"v1", "v3"}
        assert not await watcher.check_now()
        client.value = json.dumps(exp.to_dict()).encode()
        assert await watcher.check_now()
        routing = watcher.current
        client.down = True
        assert not await watcher.check_now() and watcher.current is routing
        client.down = False
        client.value = b'{"name": "e"}'  # does not check: refused, routing unchanged
        assert not await watcher.check_now() and watcher.current is routing
        assert metrics.value("recstack_experiment_state_errors_total") == 2
        client.value = None  # the key is gone: no experiment
        assert await watcher.check_now() and watcher.current is None

    asyncio.run(main())


def test_start_names_the_arm_whose_version_is_not_in_the_models_folder(tmp_path, capsys):
    from recstack.cli import main

    (tmp_path / "v20240101-000000").mkdir()  # no manifest: not a complete version
    argv = ["experiment", "start", "--name", "x", "--arm", "A=v20240101-000000:0.5"]
    assert main([*argv, "--arm", "B=v20240102-000000:0.5", "--models", str(tmp_path)]) == 2
    assert "--arm A: version 'v20240101-000000' is not a complete version in" in capsys.readouterr().err
    assert (
        main(
            [
                *argv,
                "--arm",
                "B=v20240102-000000:0.4",
                "--skip-version-check",
                "--redis",
                "redis://127.0.0.1:1/0",
            ]
        )
        == 2
    )
    assert "arms.share: the live arms' shares must sum to 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- shadow: CPU budget
def test_shadow_budget_is_a_share_of_the_rest_of_the_process_cpu_per_window():
    from services.ranking.engine import ShadowBudget

    clock = SimpleNamespace(cpu=0.0, now=0.0)
    budget = ShadowBudget(0.1, window_s=5.0, cpu=lambda: clock.cpu, clock=lambda: clock.now)
    assert budget.allows()  # nothing spent yet
    budget.charge(0.02)
    clock.cpu = 0.02 + 0.1  # live work 0.1 s: 10% of it is 0.01 s, the shadow spent 0.02 s
    assert not budget.allows()
    clock.cpu = 0.02 + 0.2  # live 0.2 s: exactly at the share
    assert budget.allows()
    budget.charge(0.01)
    clock.cpu += 0.01
    assert not budget.allows()
    clock.now = 5.0  # a new window: what was spent before no longer counts
    assert budget.allows()


def test_a_batch_over_the_shadow_budget_gets_no_follow_up_and_offers_its_impressions_at_once():
    from services.ranking.engine import BatchEngine
    from services.ranking.experiments import Routing, ShadowModel
    from services.ranking.lifecycle import ModelSlot
    from services.ranking.validation import Query

    class Ranker:
        def __init__(self, version):
            self.version, self.batches = version, 0

        def rank_batch(self, inputs, load):
            self.batches += 1
            return [SimpleNamespace(scores=np.arange(len(x.candidates), dtype=np.float32), path="full")
                    for x in inputs]  # fmt: skip

    live, shadow = Ranker("v1"), Ranker("v2")
    exp = new_experiment("ab", [Arm("A", "v1", 1.0), Arm("S", "v2", shadow=True)])
    routing = Routing(exp, {"A": live, "S": shadow}, ShadowModel("S", "v2", shadow))
    fetcher = SimpleNamespace(fetch=lambda users, items: SimpleNamespace(users={}, items={}, degraded=False))
    offered: list = []
    metrics = RankingMetrics()
    engine = BatchEngine(
        fetcher, ModelSlot(live), recommend_pool=10, metrics=metrics,
        experiments=SimpleNamespace(current=routing), impressions=SimpleNamespace(offer_many=offered.extend),
    )  # fmt: skip
    queries = [Query("u1", ["i1", "i2", "i3"], 2), Query("u2", ["i4", "i5"], 0)]
    charged: list[float] = []
    engine._shadow_budget = SimpleNamespace(allows=lambda: True, charge=charged.append)
    within = engine(queries, 0.0)
    assert within.followup is not None and offered == []  # the impressions wait for the shadow
    within.followup(True)
    assert shadow.batches == 1 and [rec[-1][0] for rec in offered] == ["v2", "v2"]
    assert len(charged) == 1 and charged[0] >= 0  # the shadow's scoring is charged to its budget
    engine._shadow_budget = SimpleNamespace(allows=lambda: False, charge=charged.append)
    over = engine(queries, 0.0)
    assert getattr(over, "followup", None) is None  # answered as if there were no shadow
    assert len(offered) == 4 and len(offered[-1]) == 7 and shadow.batches == 1
    assert metrics.value("recstack_shadow_batches_total", {"outcome": "over_budget"}) == 1
