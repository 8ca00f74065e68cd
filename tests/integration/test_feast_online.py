"""Feast and our fast path (``feature_store.layout``, ``reads``, ``writes``) read and write the same bytes.

Feast's ``get_online_features`` reads back exactly what the fast path wrote (whole entities and
stream merges), and the fast path reads exactly what Feast's ``push`` wrote. Also: old events
replayed later still count (Feast would skip a row that is not newer), and the written-at time
never moves backwards.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.integration

USER_REFS = [
    "user_activity:views",
    "user_activity:add_to_carts",
    "user_activity:purchases",
    "user_activity:last_event_ts",
    "user_activity:recent_items",
    "user_activity:purchased_items",
    "user_activity:top_categories",
    "user_activity:top_category_weights",
]
ITEM_REFS = [
    "item_popularity:views",
    "item_popularity:add_to_carts",
    "item_popularity:purchases",
    "item_popularity:trending",
    "item_popularity:last_event_ts",
    "item_popularity:category",
    "item_popularity:price",
]


@pytest.fixture(scope="module")
def feast_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("feast"))


@pytest.fixture
def store(redis_url, feast_dir):
    from feature_store.store import open_store

    return open_store(redis_url, feast_dir)


def _f32(x: float) -> float:
    return float(np.float32(x))


def _feast_users(store, user_ids):
    got = store.get_online_features(
        features=USER_REFS, entity_rows=[{"user_id": u} for u in user_ids]
    ).to_dict()
    return [{ref.split(":")[1]: got[ref.split(":")[1]][i] for ref in USER_REFS} for i in range(len(user_ids))]


def _feast_items(store, item_ids):
    got = store.get_online_features(
        features=ITEM_REFS, entity_rows=[{"item_id": i} for i in item_ids]
    ).to_dict()
    return [{ref.split(":")[1]: got[ref.split(":")[1]][i] for ref in ITEM_REFS} for i in range(len(item_ids))]


def _as_dict(features) -> dict:
    from dataclasses import asdict

    out = asdict(features)
    out.pop("written_at_ms")
    return out


def test_feast_reads_what_the_fast_path_wrote(store, redis_client):
    from feature_store.reads import read_features
    from feature_store.values import ItemFeatures, UserFeatures
    from feature_store.writes import write_features

    users = {
        "u-1": UserFeatures(
            views=7,
            add_to_carts=2,
            purchases=1,
            last_event_ts=1_700_000_123_456,
            recent_items=[f"i{k}" for k in range(50)],
            purchased_items=["i3", "ünïcødé"],
            top_categories=["shoes", "hats"],
            top_category_weights=[9, 4],
        ),
        "u-empty": UserFeatures(),
    }
    items = {
        "i-1": ItemFeatures(
            views=10,
            add_to_carts=3,
            purchases=2,
            trending=12.75,
            last_event_ts=1_700_000_000_001,
            category="shoes",
            price=19.99,
        ),
        "i-2": ItemFeatures(views=1, trending=0.1),
    }
    write_features(redis_client, users, items, written_at_ms=1_700_000_200_000)

    feast_users = _feast_users(store, ["u-1", "u-empty", "nobody"])
    assert feast_users[0] == _as_dict(users["u-1"])
    assert feast_users[1] == _as_dict(users["u-empty"])
    assert all(v is None for v in feast_users[2].values())

    feast_items = _feast_items(store, ["i-1", "i-2", "nothing"])
    assert feast_items[0] == {**_as_dict(items["i-1"]), "trending": 12.75, "price": _f32(19.99)}
    assert feast_items[1] == {
        **_as_dict(items["i-2"]),
        "trending": _f32(0.1),
        "category": None,
        "price": None,
    }
    assert all(v is None for v in feast_items[2].values())

    fast_users, fast_items = read_features(redis_client, ["u-1", "nobody"], ["i-1", "nothing"])
    assert fast_users[0] == UserFeatures(**{**_as_dict(users["u-1"]), "written_at_ms": 1_700_000_200_000})
    assert fast_users[1] is None and fast_items[1] is None
    assert fast_items[0].price == _f32(19.99) and fast_items[0].category == "shoes"


def test_feast_reads_what_a_stream_merge_wrote(store, redis_client):
    from feature_store.reads import read_features
    from feature_store.values import ItemDelta, UserDelta
    from feature_store.writes import BatchGuard, FeatureWriter

    writer = FeatureWriter(redis_client, half_life_s=3600)
    users = {
        "u-a": UserDelta(
            views=2,
            purchases=1,
            last_event_ts=5_000,
            recent_items=["x", "y"],
            purchased_items=["y"],
            category_weights={"c1": 6, "c2": 1},
        )
    }
    items = {
        "x": ItemDelta(views=1, trending=1.0, last_event_ts=4_000, category="c2"),
        "y": ItemDelta(views=1, purchases=1, trending=6.0, last_event_ts=5_000, category="c1", price=2.5),
    }
    guard = BatchGuard(offsets_key=b"test:offsets", expected={0: -1}, applied={0: 2})
    assert writer.apply(users, items, guard, writer.read(list(users)), now_ms=1_700_000_000_000).ok

    (fast_user,), fast_items = read_features(redis_client, ["u-a"], ["x", "y"])
    (feast_user,) = _feast_users(store, ["u-a"])
    assert feast_user == _as_dict(fast_user)
    assert feast_user == {
        "views": 2,
        "add_to_carts": 0,
        "purchases": 1,
        "last_event_ts": 5_000,
        "recent_items": ["x", "y"],
        "purchased_items": ["y"],
        "top_categories": ["c1", "c2"],
        "top_category_weights": [6, 1],
    }
    # an item never seen with a price has no price field: Feast says None, the fast path 0.0
    assert _feast_items(store, ["x", "y"]) == [
        {**_as_dict(f), "price": f.price or None, "category": f.category or None} for f in fast_items
    ]
    assert fast_items[1].price == 2.5 and fast_items[0].price == 0.0
    assert fast_user.written_at_ms == 1_700_000_000_000


def test_fast_path_reads_what_feast_pushed(store, redis_client):
    from feast.data_source import PushMode

    from feature_store.reads import read_features
    from feature_store.values import ItemFeatures, UserFeatures

    pushed_at = datetime(2024, 5, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    store.push(
        "user_activity_push",
        pd.DataFrame(
            {
                "user_id": ["p-1"],
                "views": [4],
                "add_to_carts": [1],
                "purchases": [0],
                "last_event_ts": [1_714_564_800_000],
                "recent_items": [["a", "b", "c"]],
                "purchased_items": [[]],
                "top_categories": [["c9"]],
                "top_category_weights": [[4]],
                "event_timestamp": [pushed_at],
            }
        ),
        to=PushMode.ONLINE,
    )
    store.push(
        "item_popularity_push",
        pd.DataFrame(
            {
                "item_id": ["a"],
                "views": [4],
                "add_to_carts": [0],
                "purchases": [0],
                "trending": [3.5],
                "last_event_ts": [1_714_564_800_000],
                "category": ["c9"],
                "price": [1.25],
                "event_timestamp": [pushed_at],
            }
        ),
        to=PushMode.ONLINE,
    )
    (user,), (item,) = read_features(redis_client, ["p-1"], ["a"])
    assert user == UserFeatures(
        views=4,
        add_to_carts=1,
        purchases=0,
        last_event_ts=1_714_564_800_000,
        recent_items=["a", "b", "c"],
        purchased_items=[],
        top_categories=["c9"],
        top_category_weights=[4],
        written_at_ms=int(pushed_at.timestamp() * 1000),
    )
    assert item == ItemFeatures(
        views=4,
        trending=3.5,
        last_event_ts=1_714_564_800_000,
        category="c9",
        price=1.25,
        written_at_ms=int(pushed_at.timestamp() * 1000),
    )


def test_old_events_still_count_and_written_at_never_moves_back(store, redis_client):
    from feature_store.reads import read_features
    from feature_store.values import ItemDelta, UserDelta
    from feature_store.writes import BatchGuard, FeatureWriter

    writer = FeatureWriter(redis_client, half_life_s=3600)
    now = 1_800_000_000_000

    def apply(offset: int, now_ms: int, event_ts: int) -> None:
        users = {"u-old": UserDelta(views=1, last_event_ts=event_ts, recent_items=[f"i{offset}"])}
        items = {"i-old": ItemDelta(views=1, trending=1.0, last_event_ts=event_ts)}
        guard = BatchGuard(b"test:old", expected={0: offset - 1}, applied={0: offset})
        assert writer.apply(users, items, guard, writer.read(list(users)), now_ms=now_ms).ok

    apply(0, now, event_ts=1_600_000_000_000)
    # A replay of even older events, by a writer whose clock is behind: Feast itself would skip
    # these rows (not newer than the stored timestamp); the merge still counts them.
    apply(1, now - 60_000, event_ts=1_500_000_000_000)
    writer.forget()  # and through a fresh read of the hash rather than the remembered state
    apply(2, now - 120_000, event_ts=1_400_000_000_000)

    (user,), (item,) = read_features(redis_client, ["u-old"], ["i-old"])
    assert (user.views, item.views) == (3, 3)
    assert user.last_event_ts == item.last_event_ts == 1_600_000_000_000
    assert user.recent_items == ["i2", "i1", "i0"]
    assert user.written_at_ms == item.written_at_ms == now
    assert _feast_users(store, ["u-old"])[0]["views"] == 3
    assert _feast_items(store, ["i-old"])[0]["views"] == 3
