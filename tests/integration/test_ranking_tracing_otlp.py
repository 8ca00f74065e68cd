"""``recstack serve --tracing`` exports over OTLP where the standard OTEL_* variables say: a real
server process, and a small OTLP/gRPC trace receiver in the test standing in for a collector."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from serving import free_port, wait_until_serving

from recstack.v1 import ranking_pb2, ranking_pb2_grpc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span as (service name, span name, attributes)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (the generated method name)
        with self.lock:
            for resource_spans in request.resource_spans:
                service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        attributes = {a.key: a.value for a in span.attributes}
                        self.spans.append((service.get("service.name", ""), span.name, attributes))
        return trace_service_pb2.ExportTraceServiceResponse()

    def names(self) -> set[str]:
        with self.lock:
            return {name for _, name, _ in self.spans}


def test_serve_with_tracing_exports_its_spans_over_otlp(redis_url, tmp_path) -> None:
    from test_ranking_server import ITEMS, V1, publish_model

    receiver = Receiver()
    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    collector_port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    publish_model(tmp_path / "models", V1, seed=1)
    port = free_port()
    env = dict(
        os.environ,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector_port}",
        OTEL_SERVICE_NAME="ranking-under-test",
        OTEL_BSP_SCHEDULE_DELAY="100",  # ms: export soon after the call
    )
    env.pop("OTEL_SDK_DISABLED", None)
    env.pop("OTEL_TRACES_EXPORTER", None)
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "recstack.cli", "serve", "--tracing", "--host", "127.0.0.1",
             "--port", str(port), "--models", str(tmp_path / "models"), "--redis", redis_url],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until_serving(port, process, log_path.read_text)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            assert stub.Rank(ranking_pb2.RankRequest(user_id="u1", item_ids=ITEMS[:20]), timeout=30).items
        wanted = {"recstack.v1.RankingService/Rank", "ranking.batch", "ranking.fetch", "ranking.forward"}
        deadline = time.monotonic() + 30
        while not wanted <= receiver.names() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert wanted <= receiver.names(), (receiver.names(), log_path.read_text())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        collector.stop(0)
    assert {service for service, _, _ in receiver.spans} == {"ranking-under-test"}
    (forward,) = [attrs for _, name, attrs in receiver.spans if name == "ranking.forward"]
    assert forward["recstack.model.version"].string_value == V1
    assert "tracing on: otlp spans of service ranking-under-test" in log_path.read_text()
