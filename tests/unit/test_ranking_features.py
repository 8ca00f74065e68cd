"""FeatureFetcher's item catalogue and degraded mode, and the engine's response encoding, without Redis."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis

from feature_store.values import ItemFeatures, UserFeatures
from recstack.v1 import ranking_pb2
from services.ranking import catalogue as catalogue_module
from services.ranking import features as features_module
from services.ranking.encoding import ENCODED_FIELDS, new_request_id
from services.ranking.encoding import encode_response as encode
from services.ranking.engine import NO_STATS, item_stats_of, rank_input
from services.ranking.features import FeatureFetcher
from services.ranking.metrics import RankingMetrics


class FakeStore:
    """Stands in for ``read_features``: records what each read asked for; can fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []
        self.fail = False

    def __call__(self, client, user_ids, item_ids):
        if self.fail:
            raise redis.ConnectionError("Redis is down")
        self.calls.append((list(user_ids), sorted(item_ids)))
        users = [
            UserFeatures(views=1, recent_items=["a"]) if u.startswith("known") else None for u in user_ids
        ]
        items = [ItemFeatures(views=len(i), trending=0.5) if i != "unknown" else None for i in item_ids]
        return users, items


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(monkeypatch) -> FakeStore:
    fake = FakeStore()
    monkeypatch.setattr(features_module, "read_features", fake)
    monkeypatch.setattr(catalogue_module, "read_features", fake)
    return fake


def _fetcher(clock: Clock, metrics: RankingMetrics | None = None) -> FeatureFetcher:
    return FeatureFetcher(
        "redis://127.0.0.1:1/0",
        clock=clock,
        item_transform=item_stats_of,
        metrics=metrics or RankingMetrics(),
        retry_interval_s=0.01,
    )


def test_items_are_read_once_then_held_users_always_read(store):
    clock, metrics = Clock(), RankingMetrics()
    fetcher = _fetcher(clock, metrics)
    first = fetcher.fetch(["known-1", "new-2"], ["a", "b", "unknown", "a"])
    assert not first.degraded
    assert first.users["known-1"].views == 1 and first.users["new-2"] is None
    assert store.calls[-1] == (["known-1", "new-2"], ["a", "b", "unknown"])  # each item once
    assert {i: first.items.get(i) for i in ("a", "b", "unknown")} == {
        "a": (1.0, 0.0, 0.0, 0.5),
        "b": (1.0, 0.0, 0.0, 0.5),
        "unknown": NO_STATS,
    }

    clock.now += 3600.0  # no TTL: the catalogue's refresher, not time, replaces held items
    second = fetcher.fetch(["known-1"], ["a", "b", "unknown", "c"])
    assert store.calls[-1] == (["known-1"], ["c"])  # users re-read, held items not
    assert second.items.get("unknown") == NO_STATS and second.items.get("c") == (1.0, 0.0, 0.0, 0.5)
    assert metrics.value("recstack_ranking_item_cache_total", {"result": "hit"}) == 3
    assert metrics.value("recstack_ranking_item_cache_total", {"result": "miss"}) == 4


def test_the_catalogue_rereads_only_what_the_feed_names(store):
    clock, metrics = Clock(), RankingMetrics()
    fetcher = _fetcher(clock, metrics)
    fetcher.fetch(["known-1"], ["a", "b", "c"])
    feed = FakeFeed()
    catalogue = fetcher.catalogue
    catalogue._stream = feed
    feed.entries = [(b"1-0", {b"items": b"x"})]
    assert catalogue.refresh() == 0  # starts at the newest entry: nothing it holds changed since
    feed.entries.append((b"2-0", {b"items": b"b\nnot-held"}))
    assert catalogue.refresh() == 1
    assert store.calls[-1] == ([], ["b"])  # only the changed item the catalogue holds
    clock.now += 61.0  # the periodic resync re-reads everything held
    assert catalogue.refresh() == 3
    feed.entries = [(b"9-0", {b"items": b"a"})]  # what we read last was trimmed away: a gap
    assert catalogue.refresh() == 3
    assert metrics.value("recstack_ranking_catalogue_reads_total", {"why": "resync"}) == 6


class FakeFeed:
    """Stands in for the redis-py client on the item change stream."""

    def __init__(self) -> None:
        self.entries: list[tuple[bytes, dict[bytes, bytes]]] = []

    def xrevrange(self, key, count=None):
        return self.entries[::-1][:count]

    def xrange(self, key, min="-", count=None):
        def key_of(entry_id: bytes) -> tuple[int, int]:
            ms, _, seq = entry_id.decode().partition("-")
            return int(ms), int(seq)

        lo = key_of(min)
        return [e for e in self.entries if key_of(e[0]) >= lo][:count]


def test_redis_failure_serves_degraded_at_once_then_recovers_through_the_probe(store, monkeypatch):
    clock, metrics = Clock(), RankingMetrics()
    fetcher = _fetcher(clock, metrics)
    fetcher.fetch(["known-1"], ["a"])
    store.fail = True
    down = fetcher.fetch(["known-1"], ["a", "b"])
    assert down.degraded and not fetcher.redis_up
    assert down.users == {"known-1": None}
    # what the catalogue holds is served while Redis is down; an item it never read is unknown
    assert down.items.get("a", NO_STATS) == (1.0, 0.0, 0.0, 0.5) and down.items.get("b", NO_STATS) == NO_STATS
    calls = len(store.calls)
    again = fetcher.fetch(["known-1"], ["a"])
    assert again.degraded and len(store.calls) == calls  # no read is even tried while down
    assert metrics.value("recstack_ranking_redis_failures_total") == 1

    store.fail = False
    pings = iter([False, True])
    monkeypatch.setattr(fetcher, "_ping", lambda: next(pings))

    async def probe_until_up() -> None:
        fetcher.start()
        while not fetcher.redis_up:
            await asyncio.sleep(0.005)
        await fetcher.stop()

    asyncio.run(asyncio.wait_for(probe_until_up(), 30))
    assert not fetcher.fetch(["known-1"], ["a"]).degraded


def _decoded(*args) -> ranking_pb2.RankResponse:
    return ranking_pb2.RankResponse.FromString(encode(*args))  # what a client's stubs read


def test_encode_orders_best_first_and_keeps_request_order_on_ties():
    ids = ["a", "b", "c", "d", "e"]
    scores = np.array([0.1, 0.9, 0.5, 0.9, -1.0], dtype=np.float32)
    full = _decoded(ids, scores, 0, "light", "v1", False)
    assert [x.item_id for x in full.items] == ["b", "d", "c", "a", "e"]
    assert [x.score for x in full.items] == pytest.approx([0.9, 0.9, 0.5, 0.1, -1.0])
    assert (full.path, full.model_version, full.degraded) == ("light", "v1", False)
    top = _decoded(ids, scores, 2, "full", "v1", True)
    assert [x.item_id for x in top.items] == ["b", "d"] and top.degraded
    assert [x.item_id for x in _decoded(ids, scores, 99, "full", "v1", False).items] == [
        "b",
        "d",
        "c",
        "a",
        "e",
    ]
    assert len(_decoded([], np.zeros(0, np.float32), 3, "light", "v1", False).items) == 0


def test_the_wire_encoder_writes_what_the_generated_classes_write():
    rng = np.random.default_rng(7)
    # ids of every length class: one-byte and two-byte varint lengths, non-ASCII text
    ids = ["x", "85123A", "ü" * 70, "k" * 300, *(f"sku-{k}" for k in range(60))]
    scores = rng.normal(size=len(ids)).astype(np.float32)
    cases = (
        (0, "cascade", "v20240101-000000", True, "", ""),
        (7, "light", "", False, new_request_id(), "treatment-ü"),
    )
    for top_k, path, version, degraded, request_id, arm in cases:
        got = encode(ids, scores, top_k, path, version, degraded, request_id, arm)
        order = np.argsort(-scores, kind="stable")[: top_k or None]
        want = ranking_pb2.RankResponse(
            model_version=version, path=path, degraded=degraded, request_id=request_id, arm=arm
        )
        for i in order:
            want.items.add(item_id=ids[i], score=float(scores[i]))
        assert got == want.SerializeToString()  # byte for byte (no score is exactly 0 here)
        assert ranking_pb2.RankResponse.FromString(got) == want


def test_the_wire_encoder_covers_every_field_of_the_response():
    written = {
        (message.name, f.name)
        for message in (ranking_pb2.RankResponse.DESCRIPTOR, ranking_pb2.ScoredItem.DESCRIPTOR)
        for f in message.fields
    }
    # A field added to the proto must be written by services/ranking/encoding.py too.
    assert written == ENCODED_FIELDS


def test_request_ids_are_unique_and_fixed_length():
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_rank_input_of_cold_and_warm_users():
    stats = {"a": (1.0, 2.0, 3.0, 4.0)}
    cold = rank_input(None, ["a", "zz"], stats, now_ms=10_000)
    assert cold.recent_items == () and cold.user_counts == (0.0, 0.0, 0.0)
    assert cold.seconds_since_last_event is None
    np.testing.assert_array_equal(cold.item_stats, [[1, 2, 3, 4], [0, 0, 0, 0]])
    warm = rank_input(
        UserFeatures(views=3, purchases=1, last_event_ts=4_000, recent_items=["x"]), ["a"], stats, 10_000
    )
    assert warm.recent_items == ["x"] and warm.user_counts == (3.0, 0.0, 1.0)
    assert warm.seconds_since_last_event == 6.0
    assert warm.item_stats.dtype == np.float32 and warm.item_stats.shape == (1, 4)
