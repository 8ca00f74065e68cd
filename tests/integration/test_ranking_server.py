"""The ranking server over a real gRPC channel, with real Redis and real model artifacts.

Each test runs a server (port 0) on its own event loop in a background thread and calls it
with the synchronous gRPC client, as a storefront would. Models are small randomly initialised
versions of the real architecture, published with the models package's own artifact writer;
features are written with ``feature_store.writes``' helpers. Expected scores come from the raw
values a test wrote, through the transforms docs/MODEL.md documents, written out here, into the
model itself: not through the server's feature reader or input helpers, nor the inference API, so
a wrong transform or a swapped feature on the serving side shows. Waits poll for a condition with
a generous limit; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feature_store.values import ItemFeatures, UserFeatures
from feature_store.writes import write_features
from recstack.v1 import ranking_pb2, ranking_pb2_grpc
from services.ranking.config import RankingConfig
from services.ranking.server import SERVICE_NAME, RankingServer, create_server

pytestmark = pytest.mark.integration

ITEMS = [f"item-{k}" for k in range(300)]
V1, V2 = "v20240101-000000", "v20240102-000000"
WAIT_S = 60.0


# ------------------------------------------------------------------------------------ helpers
def publish_model(models_dir: Path, version: str, seed: int, items: list[str] = ITEMS) -> Path:
    """A small random model of the served architecture, published as ``version``."""
    import torch

    from models.artifacts import publish_version
    from models.model import ItemEmbeddingConfig, RankerConfig, TwoPathRanker
    from models.vocab import ItemVocab

    vocab = ItemVocab(items)
    torch.manual_seed(seed)
    model = TwoPathRanker(RankerConfig(embedding=ItemEmbeddingConfig(num_rows=len(vocab), dim=16)))
    stats = np.random.default_rng(seed).gamma(1.0, 10.0, size=(len(vocab), 4)).astype(np.float32)
    return publish_version(models_dir, model, vocab, stats, {"note": "test model"}, version=version)


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class ServerThread:
    """A RankingServer on its own event loop in a daemon thread."""

    def __init__(self, config: RankingConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ranking-test-server", daemon=True)
        self.thread.start()
        self.server: RankingServer
        self.server, self.port = self.run(create_server(config))
        self.run(self.server.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)

    def run(self, coro, timeout_s: float = WAIT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.server.metrics.value(name, labels)

    def close(self) -> None:
        self.channel.close()
        try:
            self.run(self.server.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def start_server(redis_url: str, models_dir: Path) -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def start(**overrides) -> ServerThread:
        settings = dict(
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            models_dir=models_dir,
            redis_url=redis_url,
            model_poll_interval_s=0.1,
            # Shedding by queue wait is covered by the batcher's unit tests; here a busy shared
            # test machine must not turn a slow moment into RESOURCE_EXHAUSTED.
            max_queue_wait_ms=0.0,
            redis_timeout_ms=2000.0,
            redis_retry_interval_s=0.1,
        )
        settings.update(overrides)
        server = ServerThread(RankingConfig(**settings))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def seed_features(
    redis_url: str, users: dict[str, UserFeatures], n_items: int = 150
) -> dict[str, ItemFeatures]:
    """Writes the users and the first ``n_items`` items' features; returns the items written."""
    client = redis.Redis.from_url(redis_url)
    items = {
        item: ItemFeatures(
            views=10 * k, add_to_carts=k, purchases=k // 3, trending=k / 7.0, last_event_ts=1_700_000_000_000
        )
        for k, item in enumerate(ITEMS[:n_items])
    }
    write_features(client, users=users, items=items)
    client.close()
    return items


def warm_user(recent: list[str], purchased: list[str] | None = None) -> UserFeatures:
    now_ms = int(time.time() * 1000)
    return UserFeatures(
        views=40,
        add_to_carts=6,
        purchases=2,
        last_event_ts=now_ms - 3_600_000,
        recent_items=recent,
        purchased_items=purchased or [],
    )


def expected_scores(
    version_dir: Path,
    user: UserFeatures,
    items: dict[str, ItemFeatures],
    candidates: list[str],
    now_ms: int,
    path: str = "cascade",
    quantized: bool = True,
) -> np.ndarray:
    """What the model says for the features this test wrote, with the model's inputs built here.

    The documented inputs (docs/MODEL.md, "Features"; models/vocab.py): rows in ``vocab.json``
    order from row 2 (0 is padding, 1 an unknown item); the user's ``log1p`` of views, carts and
    purchases, ``log1p`` of hours since the last event and a "no event yet" flag; each candidate's
    ``log1p`` of views, carts, purchases and trending (zeros for an item without features). The
    cascade re-scores a head of 20 (a warm user, at most 1,000 candidates, no load: "Routing").
    """
    import torch

    from models.artifacts import load_model
    from models.model import RankBatch
    from services.ranking.config import RankingConfig

    row = {item: 2 + k for k, item in enumerate(json.loads((version_dir / "vocab.json").read_text()))}
    hist = [row.get(item, 1) for item in user.recent_items[:50]] or [0]
    hours = max(0.0, now_ms - user.last_event_ts) / 3_600_000
    user_in = [math.log1p(user.views), math.log1p(user.add_to_carts), math.log1p(user.purchases)]
    user_in += [math.log1p(hours), 0.0]
    item_in = []
    for c in candidates:
        f = items.get(c)
        raw = (f.views, f.add_to_carts, f.purchases, f.trending) if f is not None else (0, 0, 0, 0)
        item_in.append([math.log1p(x) for x in raw])
    batch = RankBatch(
        hist=torch.tensor([hist]),
        user_dense=torch.tensor([user_in], dtype=torch.float32),
        cand=torch.tensor([[row.get(c, 1) for c in candidates]]),
        item_dense=torch.tensor([item_in], dtype=torch.float32),
    )
    runtime = RankingConfig().dense_runtime if quantized else None  # the weights the server runs
    model, _, _, _ = load_model(version_dir, quantized=quantized, dense_runtime=runtime)
    with torch.inference_mode():
        if path == "cascade":
            scores = model.cascade(batch, torch.tensor([20]))
        else:
            scores = getattr(model, path)(batch)
    return scores[0].float().numpy()


class HeldRanker:
    """Wraps the served ranker; each batch waits for ``release`` and is recorded."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.version = inner.version
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[list[str]] = []

    def rank_batch(self, inputs, load=0.0, force_path=None):
        self.seen.extend(list(inp.candidates) for inp in inputs)
        self.entered.set()
        assert self.release.wait(WAIT_S)
        return self.inner.rank_batch(inputs, load=load, force_path=force_path)

    def candidates(self, *args, **kwargs):
        return self.inner.candidates(*args, **kwargs)


def rank(user: str, items: list[str], top_k: int = 0) -> ranking_pb2.RankRequest:
    return ranking_pb2.RankRequest(user_id=user, item_ids=items, top_k=top_k)


# -------------------------------------------------------------------------------------- tests
def test_ranking_order_follows_the_model_scores(start_server, redis_url, models_dir):
    version_dir = publish_model(models_dir, V1, seed=1)
    user = warm_user(ITEMS[:30])
    items = seed_features(redis_url, {"u1": user})
    server = start_server()
    candidates = ITEMS[100:160] + ["never-seen-item"]  # an unknown item is cold start, not an error

    before = time.time_ns() // 1_000_000
    got = server.stub.Rank(rank("u1", candidates), timeout=30)
    now_ms = (before + time.time_ns() // 1_000_000) // 2

    assert got.model_version == V1 and not got.degraded
    assert got.path == "cascade"  # a warm user with more candidates than the cascade head
    ids, scores = [x.item_id for x in got.items], np.array([x.score for x in got.items])
    assert sorted(ids) == sorted(candidates)
    assert np.all(np.diff(scores) <= 0), "best first"
    want = expected_scores(version_dir, user, items, candidates, now_ms)
    by_id = dict(zip(ids, scores, strict=True))
    np.testing.assert_allclose([by_id[c] for c in candidates], want, rtol=1e-3, atol=1e-3)

    top = server.stub.Rank(rank("u1", candidates, top_k=5), timeout=30)
    assert [x.item_id for x in top.items] == ids[:5]

    # Served as the default runtime says: traced graphs, and the heap frozen out of the collector.
    served = server.server.backend.models.current
    assert served.compiled is not None and ("cascade", 20) in served.compiled.traced
    assert gc.get_freeze_count() > 0


def test_new_user_features_change_the_answer(start_server, redis_url, models_dir):
    publish_model(models_dir, V1, seed=1)
    seed_features(redis_url, {})
    server = start_server()
    candidates = ITEMS[:80]

    cold = server.stub.Rank(rank("u-new", candidates), timeout=30)
    assert cold.path == "light" and not cold.degraded  # no history: the full path has nothing to attend to

    client = redis.Redis.from_url(redis_url)
    write_features(client, users={"u-new": warm_user(ITEMS[200:250])})
    client.close()
    warm = server.stub.Rank(rank("u-new", candidates), timeout=30)

    assert warm.path == "cascade"
    cold_scores = {x.item_id: x.score for x in cold.items}
    warm_scores = {x.item_id: x.score for x in warm.items}
    assert any(abs(cold_scores[i] - warm_scores[i]) > 1e-4 for i in candidates)


def test_recommend_generates_candidates_and_excludes_purchases(start_server, redis_url, models_dir):
    from models.artifacts import load_version

    version_dir = publish_model(models_dir, V1, seed=1)
    recent = ITEMS[10:40]
    ranker = load_version(version_dir)
    purchased = ranker.candidates(recent, 3)  # the items the model likes most for this history
    seed_features(redis_url, {"buyer": warm_user(recent, purchased)})
    server = start_server(recommend_pool=100)

    default = server.stub.Recommend(ranking_pb2.RecommendRequest(user_id="buyer", k=100), timeout=30)
    keep = server.stub.Recommend(
        ranking_pb2.RecommendRequest(user_id="buyer", k=100, include_purchased=True), timeout=30
    )
    small = server.stub.Recommend(ranking_pb2.RecommendRequest(user_id="buyer"), timeout=30)
    cold = server.stub.Recommend(ranking_pb2.RecommendRequest(user_id="nobody", k=7), timeout=30)

    assert len(default.items) == 100 and not set(purchased) & {x.item_id for x in default.items}
    assert set(purchased) <= {x.item_id for x in keep.items}
    assert len(small.items) == 10  # k = 0 means the default k
    assert len(cold.items) == 7 and cold.path == "light"
    for response in (default, keep, small, cold):
        scores = [x.score for x in response.items]
        assert scores == sorted(scores, reverse=True)
        assert len({x.item_id for x in response.items}) == len(response.items)
        assert response.model_version == V1


def test_recommend_never_returns_a_service_line_and_rank_still_scores_one(
    start_server, redis_url, models_dir
):
    service = ["POST", "DOT", "M", "gift_0001_20"]
    publish_model(models_dir, V1, seed=1, items=ITEMS[:60] + service)
    seed_features(redis_url, {}, n_items=60)
    # Postage on every order: the most bought line of the shop, all over this customer's history.
    client = redis.Redis.from_url(redis_url)
    write_features(
        client,
        users={"17850": warm_user(service + ITEMS[:3], purchased=service + ITEMS[:3])},
        items={"POST": ItemFeatures(views=0, add_to_carts=0, purchases=5_000, trending=900.0)},
    )
    client.close()
    server = start_server(recommend_pool=100)

    for include_purchased in (True, False):
        request = ranking_pb2.RecommendRequest(user_id="17850", k=64, include_purchased=include_purchased)
        got = [x.item_id for x in server.stub.Recommend(request, timeout=30).items]
        assert not set(got) & set(service), got[:10]
        assert set(got) <= set(ITEMS[:60]) and len(got) == (60 if include_purchased else 57)

    ranked = server.stub.Rank(rank("17850", ["POST", ITEMS[5], "gift_0001_20"]), timeout=30)
    assert sorted(x.item_id for x in ranked.items) == sorted(["POST", ITEMS[5], "gift_0001_20"])
    assert all(math.isfinite(x.score) for x in ranked.items)


def test_new_model_version_is_picked_up_without_a_failed_request(start_server, redis_url, models_dir):
    publish_model(models_dir, V1, seed=1)
    seed_features(redis_url, {"u1": warm_user(ITEMS[:30])})
    server = start_server()
    versions: list[str] = []
    errors: list[grpc.RpcError] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                versions.append(server.stub.Rank(rank("u1", ITEMS[50:150]), timeout=30).model_version)
            except grpc.RpcError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(versions) >= 5, "first answers")
        publish_model(models_dir, V2, seed=2)
        wait_for(lambda: V2 in versions[-3:], "answers from the new version")
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT_S)
    assert not errors, errors[:3]
    first_new = versions.index(V2)
    assert set(versions[:first_new]) == {V1}
    assert server.metric("recstack_ranking_model_reloads_total", {"result": "success"}) == 2
    assert server.metric("recstack_ranking_model_info", {"version": V2}) == 1


@pytest.mark.parametrize("damage", ["checksum", "unloadable"])
def test_a_corrupted_version_is_refused_and_the_current_keeps_serving(
    start_server, redis_url, models_dir, tmp_path, damage
):
    from models.artifacts import write_manifest

    publish_model(models_dir, V1, seed=1)
    seed_features(redis_url, {})
    server = start_server()
    staging = tmp_path / "staging"
    bad = publish_model(staging, V2, seed=2)
    weights = bad / "weights.int8.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if damage == "unloadable":
        write_manifest(bad)  # checksums now match the broken file: loading itself must fail
    os.rename(bad, models_dir / V2)  # appears atomically, as a publisher would

    wait_for(
        lambda: server.metric("recstack_ranking_model_reloads_total", {"result": "failure"}) >= 1,
        "the broken version to be refused",
    )
    got = server.stub.Rank(rank("u1", ITEMS[:20]), timeout=30)
    assert got.model_version == V1
    assert server.metric("recstack_ranking_model_reloads_total", {"result": "failure"}) == 1
    assert server.metric("recstack_ranking_model_reloads_total", {"result": "success"}) == 1


def test_redis_down_serves_degraded_and_recovers(start_server, redis_url, models_dir, infra_control):
    publish_model(models_dir, V1, seed=1)
    seed_features(redis_url, {"u1": warm_user(ITEMS[:30])})
    server = start_server(redis_timeout_ms=50.0)
    candidates = ITEMS[:100]
    assert not server.stub.Rank(rank("u1", candidates), timeout=30).degraded
    try:
        infra_control.stop_redis()
        down = server.stub.Rank(rank("u1", candidates), timeout=30)
        assert down.degraded and len(down.items) == len(candidates) and down.model_version == V1
        rec = server.stub.Recommend(ranking_pb2.RecommendRequest(user_id="u1", k=5), timeout=30)
        assert rec.degraded and len(rec.items) == 5
        assert server.metric("recstack_ranking_degraded_total") >= 2
        assert server.metric("recstack_ranking_redis_failures_total") >= 1
    finally:
        infra_control.start_redis()
    wait_for(lambda: not server.stub.Rank(rank("u1", candidates), timeout=30).degraded, "recovery from Redis")


def test_an_expired_request_is_dropped_before_any_work(start_server, redis_url, models_dir):
    publish_model(models_dir, V1, seed=1)
    seed_features(redis_url, {})
    # A request held in a worker thread, so that others queue behind it (a lone request on an
    # idle server is otherwise computed on the event loop, which the hold would block).
    server = start_server(max_concurrent_batches=1, inline_when_idle=False)
    held = HeldRanker(server.server.backend.models.current)
    server.server.backend.models.current = held

    first = server.stub.Rank.future(rank("u1", ITEMS[:10]), timeout=WAIT_S)
    assert held.entered.wait(WAIT_S)
    with pytest.raises(grpc.RpcError) as late:
        server.stub.Rank(rank("u2", ["only-in-the-late-request"]), timeout=0.3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    held.release.set()
    assert first.result().model_version == V1
    wait_for(lambda: server.server.backend.batcher.depth == 0, "the queue to drain")

    assert ["only-in-the-late-request"] not in held.seen
    dropped = server.metric("recstack_ranking_shed_total", {"reason": "deadline"}) + server.metric(
        "recstack_ranking_shed_total", {"reason": "cancelled"}
    )
    assert dropped == 1


def test_a_full_queue_answers_resource_exhausted(start_server, redis_url, models_dir):
    publish_model(models_dir, V1, seed=1)
    seed_features(redis_url, {})
    server = start_server(max_concurrent_batches=1, max_queue=2, inline_when_idle=False)
    held = HeldRanker(server.server.backend.models.current)
    server.server.backend.models.current = held

    running = server.stub.Rank.future(rank("u1", ITEMS[:10]), timeout=WAIT_S)
    assert held.entered.wait(WAIT_S)
    queued = [server.stub.Rank.future(rank(f"u{k}", ITEMS[:10]), timeout=WAIT_S) for k in (2, 3)]
    wait_for(lambda: server.server.backend.batcher.depth == 2, "two queued requests")
    with pytest.raises(grpc.RpcError) as shed:
        server.stub.Rank(rank("u4", ITEMS[:10]), timeout=WAIT_S)
    assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    held.release.set()
    for call in (running, *queued):
        assert call.result().model_version == V1
    assert server.metric("recstack_ranking_shed_total", {"reason": "queue_full"}) == 1


def test_graceful_stop_finishes_accepted_calls_and_refuses_new_ones(start_server, redis_url, models_dir):
    publish_model(models_dir, V1, seed=1)
    seed_features(redis_url, {})
    # A request held in a worker thread, so that others queue behind it (a lone request on an
    # idle server is otherwise computed on the event loop, which the hold would block).
    server = start_server(max_concurrent_batches=1, inline_when_idle=False)
    held = HeldRanker(server.server.backend.models.current)
    server.server.backend.models.current = held
    running = server.stub.Rank.future(rank("u1", ITEMS[:10]), timeout=WAIT_S)
    assert held.entered.wait(WAIT_S)
    queued = [server.stub.Rank.future(rank(f"u{k}", ITEMS[:10]), timeout=WAIT_S) for k in (2, 3)]
    wait_for(lambda: server.server.backend.batcher.depth == 2, "two queued requests")

    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(grace=WAIT_S), server.loop)
    health = health_pb2_grpc.HealthStub(server.channel)
    wait_for(lambda: stopping.done() or _not_serving(health), "shutdown to begin")
    with pytest.raises(grpc.RpcError) as refused:
        server.stub.Rank(rank("u4", ITEMS[:10]), timeout=WAIT_S)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    held.release.set()
    for call in (running, *queued):
        assert call.result().model_version == V1
    stopping.result(WAIT_S)


def _not_serving(health) -> bool:
    try:
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status
    except grpc.RpcError:
        return True
    return status != health_pb2.HealthCheckResponse.SERVING


INVALID = [
    (ranking_pb2.RankRequest(user_id="", item_ids=["a"]), "user_id"),
    (ranking_pb2.RankRequest(user_id="u" * 129, item_ids=["a"]), "user_id"),
    (ranking_pb2.RankRequest(user_id="u", item_ids=[]), "item_ids"),
    (ranking_pb2.RankRequest(user_id="u", item_ids=[f"i{k}" for k in range(1001)]), "item_ids"),
    (ranking_pb2.RankRequest(user_id="u", item_ids=["a", ""]), "item_ids[1]"),
    (ranking_pb2.RankRequest(user_id="u", item_ids=["a", "x" * 129]), "item_ids[1]"),
    (ranking_pb2.RankRequest(user_id="u", item_ids=["a"], top_k=-1), "top_k"),
    (ranking_pb2.RecommendRequest(user_id="", k=3), "user_id"),
    (ranking_pb2.RecommendRequest(user_id="u" * 129, k=3), "user_id"),
    (ranking_pb2.RecommendRequest(user_id="u", k=-2), "k"),
    (ranking_pb2.RecommendRequest(user_id="u", k=1001), "k"),
]


def test_every_invalid_request_answers_invalid_argument_naming_the_field(start_server, redis_url, models_dir):
    publish_model(models_dir, V1, seed=1)
    server = start_server()
    for request, field in INVALID:
        call = server.stub.Rank if isinstance(request, ranking_pb2.RankRequest) else server.stub.Recommend
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert err.value.details().startswith(f"{field}:"), (field, err.value.details())
    assert (
        server.metric(
            "recstack_ranking_request_seconds_count", {"method": "Rank", "code": "INVALID_ARGUMENT"}
        )
        == 7
    )


def test_unavailable_and_not_serving_until_a_model_loads(start_server, redis_url, models_dir):
    server = start_server()
    health = health_pb2_grpc.HealthStub(server.channel)

    def status() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30).status

    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Rank(rank("u1", ITEMS[:3]), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    publish_model(models_dir, V1, seed=1)
    wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, "SERVING")
    assert server.stub.Rank(rank("u1", ITEMS[:3]), timeout=30).model_version == V1


def test_reflection_describes_the_service(start_server, models_dir):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    server = start_server()
    services = ProtoReflectionDescriptorDatabase(server.channel).get_services()
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(services)


def test_auth_on_refuses_missing_or_wrong_tokens(start_server, redis_url, models_dir):
    publish_model(models_dir, V1, seed=1)
    server = start_server(auth_token="let-me-in")
    request = rank("u1", ITEMS[:3])
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "let-me-in")]):
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Rank(request, metadata=metadata, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "let-me-in" not in err.value.details()
    ok = server.stub.Rank(request, metadata=[("authorization", "Bearer let-me-in")], timeout=30)
    assert ok.model_version == V1
    # Health stays open to probes without credentials.
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30).status == (
        health_pb2.HealthCheckResponse.SERVING
    )


def test_tls_with_a_generated_certificate(start_server, redis_url, models_dir, tmp_path):
    # openssl is installed by `make test` (infra/tools.sh): without it this test fails, never skips.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    publish_model(models_dir, V1, seed=1)
    server = start_server(tls_cert=cert, tls_key=key)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        got = ranking_pb2_grpc.RankingServiceStub(channel).Rank(rank("u1", ITEMS[:5]), timeout=30)
    assert got.model_version == V1 and len(got.items) == 5
    with pytest.raises(grpc.RpcError) as err:  # plaintext to a TLS port does not get through
        server.stub.Rank(rank("u1", ITEMS[:5]), timeout=5)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_naive_baseline_serves_the_same_api_through_feast(
    start_server, redis_url, models_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("RECSTACK_FEAST_DIR", str(tmp_path / "feast"))
    version_dir = publish_model(models_dir, V1, seed=1)
    user = warm_user(ITEMS[:30])
    items = seed_features(redis_url, {"u1": user})
    server = start_server(naive=True)
    candidates = ITEMS[100:140]

    before = time.time_ns() // 1_000_000
    got = server.stub.Rank(rank("u1", candidates), timeout=60)
    now_ms = (before + time.time_ns() // 1_000_000) // 2

    assert got.path == "full" and got.model_version == V1 and not got.degraded
    want = expected_scores(version_dir, user, items, candidates, now_ms, path="full", quantized=False)
    by_id = {x.item_id: x.score for x in got.items}
    np.testing.assert_allclose([by_id[c] for c in candidates], want, rtol=1e-3, atol=1e-3)
    rec = server.stub.Recommend(ranking_pb2.RecommendRequest(user_id="u1", k=4), timeout=60)
    assert len(rec.items) == 4 and rec.path == "full"
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Rank(rank("", candidates), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_lone_call_runs_on_the_event_loop_and_concurrent_calls_still_batch(
    start_server, redis_url, models_dir
):
    publish_model(models_dir, V1, seed=1)
    seed_features(redis_url, {"u1": warm_user(ITEMS[:30])})
    server = start_server(max_concurrent_batches=1)
    threads: list[str] = []
    inner = server.server.backend.models.current

    class Recording:
        version = inner.version

        def rank_batch(self, inputs, load=0.0, force_path=None):
            threads.append(threading.current_thread().name)
            return inner.rank_batch(inputs, load=load, force_path=force_path)

        def candidates(self, *args, **kwargs):
            return inner.candidates(*args, **kwargs)

    server.server.backend.models.current = Recording()
    for _ in range(3):
        time.sleep(0.02)  # a lone call: the server has been idle a while
        assert len(server.stub.Rank(rank("u1", ITEMS[:50]), timeout=30).items) == 50
    # computed on the event loop's own thread: no hand-off to a batch worker and back
    assert len(threads) == 3 and not any(t.startswith("rank-batch") for t in threads)
    served_before = server.metric("recstack_ranking_batch_requests_count")

    threads.clear()
    calls = [server.stub.Rank.future(rank("u1", ITEMS[:50]), timeout=30) for _ in range(40)]
    assert all(len(c.result().items) == 50 for c in calls)
    batches = server.metric("recstack_ranking_batch_requests_count") - served_before
    assert batches < 40  # concurrent calls shared batches
    assert any(t.startswith("rank-batch") for t in threads)  # ...computed by the worker


def test_item_features_changed_by_the_stream_reach_rank_within_the_refresh_bound(
    start_server, redis_url, models_dir
):
    from feature_store.values import ItemDelta
    from feature_store.writes import BatchGuard, FeatureWriter

    publish_model(models_dir, V1, seed=1)
    seed_features(redis_url, {"u1": warm_user(ITEMS[:30])})
    server = start_server(item_refresh_ms=100.0, item_resync_s=3600.0)
    candidates = ITEMS[200:260]  # unknown to Redis so far: all start with the same zero counters
    first = server.stub.Rank(rank("u1", candidates), timeout=30)
    before = {item.item_id: item.score for item in first.items}
    assert server.metric("recstack_ranking_catalogue_items") >= len(candidates)

    # The stream consumer's own writer applies a batch that makes one candidate very popular.
    client = redis.Redis.from_url(redis_url)
    writer = FeatureWriter(client)
    popular = candidates[-1]
    delta = ItemDelta(
        views=5_000, add_to_carts=800, purchases=400, trending=900.0, last_event_ts=int(time.time() * 1000)
    )
    guard = BatchGuard(offsets_key=b"test:offsets", expected={0: -1}, applied={0: 0})
    assert writer.apply({}, {popular: delta}, guard, writer.read([])).ok
    written = time.monotonic()

    held = server.server.backend.fetcher.catalogue  # what every Rank batch reads its items from
    wait_for(lambda: held.get(popular) == (5000.0, 800.0, 400.0, 900.0), "the change to reach the catalogue")
    seen_after = time.monotonic() - written
    after = {item.item_id: item.score for item in server.stub.Rank(rank("u1", candidates), timeout=30).items}
    others = [c for c in candidates if c != popular]
    # The popular item rose against every other candidate, which kept its (zero) counters.
    assert min(after[popular] - after[c] for c in others) > min(before[popular] - before[c] for c in others)
    # Only the announced item was re-read: no resync, no read of the other held items.
    assert server.metric("recstack_ranking_catalogue_reads_total", {"why": "changed"}) == 1
    assert server.metric("recstack_ranking_catalogue_reads_total", {"why": "resync"}) == 0
    assert seen_after < 5.0
