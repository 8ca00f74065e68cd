"""OpenTelemetry tracing of Rank and Recommend: a real server (real model, real Redis) whose spans
go to the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from recstack.v1 import ranking_pb2, ranking_pb2_grpc
from services.ranking.config import RankingConfig
from services.ranking.server import create_server
from services.ranking.tracing import RankTracing

pytestmark = pytest.mark.integration

RANK = "recstack.v1.RankingService/Rank"
STAGES = ("ranking.fetch", "ranking.assemble", "ranking.forward", "ranking.encode")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Traced:
    """A ranking server with tracing into memory, on an event loop in a daemon thread."""

    def __init__(self, config: RankingConfig) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="traced-server", daemon=True).start()
        self.server, port = self._run(create_server(config, tracing=RankTracing(provider)))
        self._run(self.server.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def spans(self, name: str) -> list:
        # A call's span ends when its handler returns, which can be just after the client has
        # its answer (a refusal, above all): give the server a moment before reading none.
        deadline = time.monotonic() + 5
        while True:
            found = [s for s in self.exporter.get_finished_spans() if s.name == name]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def children(self, parent) -> list:  # type: ignore[no-untyped-def]
        return [
            s
            for s in self.exporter.get_finished_spans()
            if s.parent is not None and s.parent.span_id == parent.context.span_id
        ]

    def close(self) -> None:
        self.channel.close()
        try:
            self._run(self.server.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def traced(redis_url, tmp_path) -> Iterator:
    from test_ranking_server import ITEMS, V1, publish_model, seed_features, warm_user

    publish_model(tmp_path / "models", V1, seed=1)
    seed_features(redis_url, {"u1": warm_user(ITEMS[:30], purchased=ITEMS[:2])})
    servers: list[Traced] = []

    def start(**overrides) -> Traced:
        settings = dict(
            host="127.0.0.1", port=0, metrics_port=0, models_dir=tmp_path / "models", redis_url=redis_url,
            # No shedding (by queue wait or loop lag): a busy test machine must not refuse a call.
            max_queue_wait_ms=0.0, max_loop_lag_ms=0.0, redis_timeout_ms=2000.0,
        )  # fmt: skip
        settings.update(overrides)
        servers.append(Traced(RankingConfig(**settings)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_rank_call_has_its_span_and_its_batch_stages(traced) -> None:
    from test_ranking_server import ITEMS, V1

    server = traced()
    parent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"  # the caller's W3C trace context
    request = ranking_pb2.RankRequest(user_id="u1", item_ids=ITEMS[:50], top_k=5)
    assert len(server.stub.Rank(request, timeout=30, metadata=(("traceparent", parent),)).items) == 5

    (call,) = server.spans(RANK)
    assert call.kind == SpanKind.SERVER
    assert format(call.context.trace_id, "032x") == TRACE_ID  # joined the caller's trace
    assert call.attributes["rpc.system"] == "grpc"
    assert call.attributes["rpc.method"] == "Rank"
    assert call.attributes["recstack.candidates"] == 50 and call.attributes["recstack.top_k"] == 5
    assert call.attributes["rpc.grpc.status_code"] == 0
    assert call.status.status_code != StatusCode.ERROR

    under_call = {s.name: s for s in server.children(call)}
    assert set(under_call) == {"ranking.queue_wait", "ranking.batch"}
    batch = under_call["ranking.batch"]
    assert batch.attributes["recstack.batch.requests"] == 1
    assert batch.attributes["recstack.batch.candidates"] == 50
    assert batch.attributes["recstack.batch.inline"] is True  # an idle server computes it at once
    stages = {s.name: s for s in server.children(batch)}
    assert set(stages) == set(STAGES)
    assert stages["ranking.fetch"].attributes["recstack.users"] == 1
    assert stages["ranking.fetch"].attributes["recstack.items"] == 50
    assert stages["ranking.fetch"].attributes["recstack.degraded"] is False
    assert stages["ranking.forward"].attributes["recstack.model.version"] == V1
    assert stages["ranking.encode"].attributes["recstack.responses"] == 1
    # the stages run in order, inside the batch, inside the call
    ordered = [stages[name] for name in STAGES]
    assert all(a.end_time <= b.start_time for a, b in zip(ordered, ordered[1:], strict=False))
    assert call.start_time <= batch.start_time <= ordered[0].start_time
    assert ordered[-1].end_time <= batch.end_time <= call.end_time


def test_a_shared_batch_links_every_call_and_recommend_traces_candidates(traced) -> None:
    from test_ranking_server import ITEMS

    # No inline path and one batch at a time: concurrent calls queue up and share batches.
    server = traced(inline_when_idle=False, max_concurrent_batches=1, max_queue_delay_ms=20.0)
    calls = [
        server.stub.Rank.future(ranking_pb2.RankRequest(user_id=f"u{k % 3}", item_ids=ITEMS[:40]), timeout=30)
        for k in range(30)
    ]
    assert all(len(c.result().items) == 40 for c in calls)
    batches = server.spans("ranking.batch")
    assert all(b.attributes["recstack.batch.inline"] is False for b in batches)
    assert sum(b.attributes["recstack.batch.requests"] for b in batches) == 30
    shared = max(batches, key=lambda b: b.attributes["recstack.batch.requests"])
    assert shared.attributes["recstack.batch.requests"] > 1, "no two calls ever shared a batch"
    calls_by_id = {s.context.span_id: s for s in server.spans(RANK)}
    linked = [link.context.span_id for link in shared.links]
    assert len(linked) == shared.attributes["recstack.batch.requests"]
    assert shared.parent.span_id == linked[0]  # a child of its oldest call ...
    for span_id in linked[1:]:  # ... and every other call links back to it
        assert [link.context.span_id for link in calls_by_id[span_id].links] == [shared.context.span_id]
    assert {s.name for s in server.children(shared)} == set(STAGES)  # computed in a worker thread
    assert len(server.spans("ranking.queue_wait")) == 30

    server.exporter.clear()
    assert server.stub.Recommend(ranking_pb2.RecommendRequest(user_id="u1", k=5), timeout=30).items
    (call,) = server.spans("recstack.v1.RankingService/Recommend")
    assert call.attributes["recstack.top_k"] == 5
    (candidates,) = server.spans("ranking.candidates")
    assert candidates.attributes["recstack.generated_for"] == 1


def test_a_refused_call_has_an_error_span(traced) -> None:
    server = traced()
    with pytest.raises(grpc.RpcError) as refused:
        server.stub.Rank(ranking_pb2.RankRequest(user_id="", item_ids=["a"]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (call,) = server.spans(RANK)
    assert call.status.status_code == StatusCode.ERROR
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "user_id" in call.status.description
    assert not server.spans("ranking.batch")  # refused before any work


def test_tracing_off_leaves_no_tracing_on_the_call_path(redis_url, tmp_path, monkeypatch) -> None:
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    config = RankingConfig(host="127.0.0.1", port=0, metrics_port=0, models_dir=tmp_path, redis_url=redis_url)
    loop = asyncio.new_event_loop()
    try:
        server, _ = loop.run_until_complete(create_server(config))
        assert server.tracing is None
        assert server.backend.batcher._tracing is None and server.backend.engine._tracing is None
    finally:
        loop.close()
