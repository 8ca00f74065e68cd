"""The running services export every metric the Grafana dashboard and the alert rules read.

``recstack serve`` and ``recstack stream`` are started as the real commands, each with its
metrics on a free port, against the broker and Redis of `make up`; a little traffic goes through
each (one Rank call, a few events and one malformed record), then ``/metrics`` is scraped over
HTTP. The unit test tests/unit/test_observability.py checks the same names against the code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0  # importing torch on a busy two-core machine takes a while
TRAFFIC_TIMEOUT_S = 120.0

_EXPOSED_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def _queries_module():
    spec = importlib.util.spec_from_file_location(
        "recstack_infra_queries", ROOT / "infra" / "prometheus" / "queries.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _dashboard_metrics(prefix: str) -> set[str]:
    queries = _queries_module()
    return {name for name in queries.metric_names(queries.all_queries()) if name.startswith(prefix)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
        return response.read().decode()


def exported(text: str) -> dict[str, list[dict[str, str]]]:
    """``{sample name: label sets of its samples}`` of an exposition; families without samples yet
    (a labelled metric nothing has touched) are listed by the names their type exposes."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in _EXPOSED_SUFFIXES.get(family.type, ("",)):
            found.setdefault(family.name + suffix, [])
        for sample in family.samples:
            found.setdefault(sample.name, []).append(dict(sample.labels))
    return found


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def recstack(args: list[str], metrics_port: int, log: Path) -> Iterator[Callable[[], str]]:
    """Run ``recstack ARGS`` until the block ends (SIGTERM, then SIGKILL); yields its /metrics scraper."""
    env = dict(os.environ, RECSTACK_FEAST_DIR=str(log.parent / "feast"), PYTHONUNBUFFERED="1")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "recstack.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"`recstack {' '.join(args)}` exited with {process.returncode}:\n{_tail(log)}")
            try:
                _scrape(metrics_port)
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"no /metrics on :{metrics_port} after {START_TIMEOUT_S:.0f}s:\n{_tail(log)}")
                time.sleep(0.5)
        yield lambda: _scrape(metrics_port)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _assert_exports(found: dict[str, list[dict[str, str]]], wanted: set[str], who: str) -> None:
    missing = sorted(wanted - set(found))
    assert not missing, f"{who} does not export {missing}, which the dashboard or the alert rules read"


def _wait_for(condition: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + TRAFFIC_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {TRAFFIC_TIMEOUT_S:.0f}s:\n{_tail(log)}")
        time.sleep(0.5)


def _value(text: str, name: str) -> float:
    """The sum of every sample called ``name`` in an exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def test_ranking_server_exports_what_the_dashboard_reads(redis_url: str, tmp_path: Path) -> None:
    import grpc

    from recstack.v1 import ranking_pb2, ranking_pb2_grpc

    grpc_port, metrics_port = _free_port(), _free_port()
    models = tmp_path / "models"
    models.mkdir()
    log = tmp_path / "serve.log"
    args = [
        "serve", "--host", "127.0.0.1", "--port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--models", str(models), "--redis", redis_url,
    ]  # fmt: skip
    with recstack(args, metrics_port, log) as scrape:
        # No model version yet: the call is answered UNAVAILABLE, and timed like any other.
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT_S)
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            with pytest.raises(grpc.RpcError) as failure:
                stub.Rank(ranking_pb2.RankRequest(user_id="u1", item_ids=["i1", "i2"]), timeout=10)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        text = scrape()
    found = exported(text)
    _assert_exports(found, _dashboard_metrics("recstack_ranking_"), "recstack serve")
    latency = found["recstack_ranking_request_seconds_count"]
    assert {"method": "Rank", "code": "UNAVAILABLE"} in latency, f"the Rank call was not timed: {latency}"


def test_stream_consumer_exports_what_the_dashboard_reads(
    kafka_bootstrap: str, fresh_topic: Callable[..., str], redis_url: str, tmp_path: Path
) -> None:
    from kafka import KafkaProducer

    topic = fresh_topic(6)
    dlq = fresh_topic(6, name=f"{topic}.dlq")
    metrics_port = _free_port()
    log = tmp_path / "stream.log"
    args = [
        "stream", "--bootstrap", kafka_bootstrap, "--redis", redis_url,
        "--group", f"test-metrics-{uuid.uuid4().hex[:8]}", "--topic", topic, "--dlq-topic", dlq,
        "--event-log", str(tmp_path / "events"), "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    valid = 20
    with recstack(args, metrics_port, log) as scrape:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        try:
            now_ms = int(time.time() * 1000)
            for n in range(valid):
                event = {
                    "event_id": f"metrics-{n}", "user_id": f"u{n % 5}", "item_id": f"i{n % 7}",
                    "event_type": ("view", "add_to_cart", "purchase")[n % 3], "ts": now_ms,
                }  # fmt: skip
                producer.send(topic, key=event["user_id"].encode(), value=json.dumps(event).encode())
            producer.send(topic, key=b"u0", value=b"this is not JSON")
            producer.flush(timeout=30)
        finally:
            producer.close()

        state: dict[str, str] = {}

        def caught_up() -> bool:
            state["text"] = text = scrape()
            found = exported(text)
            return (
                _value(text, "recstack_stream_events_applied_total") >= valid
                and _value(text, "recstack_stream_events_dead_lettered_total") >= 1
                and bool(found.get("recstack_stream_consumer_lag"))
            )

        _wait_for(caught_up, f"{valid} events applied, 1 dead letter and a lag reading", log)
        text = state["text"]
    found = exported(text)
    _assert_exports(found, _dashboard_metrics("recstack_stream_"), "recstack stream")
    partitions = {labels.get("partition") for labels in found["recstack_stream_consumer_lag"]}
    assert partitions <= {str(p) for p in range(6)} and partitions, partitions
    assert _value(text, "recstack_stream_freshness_seconds_count") >= 1
