"""Training and serving compute the same features from the same events, with one set of constants.

Training: :func:`models.data.build` (item counters and ``trending`` at the cut, each user's counts,
last event and recent items at the cut). Serving: the stream's aggregation of a batch
(:func:`services.stream.aggregate.aggregate`) merged batch after batch with the update rules of
:mod:`feature_store.values` (users: ``merge_user``; items: counters added and ``decay_merge``, the
rule ``lua/codec.lua``'s ``merge_item`` applies in Redis: ``tests/integration/test_feature_parity_redis.py``
runs the real script). Both read the caps, weights and half-life from :mod:`feature_store.spec`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feature_store import spec
from feature_store.values import ItemFeatures, UserFeatures, decay_merge, merge_user
from models import data
from models.features import user_dense
from models.vocab import PAD
from recstack.events import Event
from recstack.sources import synthetic
from services.stream.aggregate import aggregate
from services.stream.config import StreamConfig

ROOT = Path(__file__).resolve().parents[2]


def event_sequence() -> pd.DataFrame:
    """Few users with many distinct items each (some past the history cap), in time order."""
    return synthetic(3_000, n_users=8, n_items=300, seed=5)


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return event_sequence()


def as_events(df: pd.DataFrame) -> list[Event]:
    return [
        Event(
            event_id=r.event_id,
            user_id=r.user_id,
            item_id=r.item_id,
            event_type=r.event_type,
            ts_ms=int(r.ts),
            price=None if pd.isna(r.price) else float(r.price),
            category=r.category,
        )
        for r in df.itertuples(index=False)
    ]


def serving_features(
    df: pd.DataFrame, batch: int = 64
) -> tuple[dict[str, UserFeatures], dict[str, ItemFeatures]]:
    """The stream consumer's path, batch by batch, with the consumer's own default half-life."""
    half_life_ms = StreamConfig().trending_half_life_s * 1000.0  # what the consumer passes on
    evs = as_events(df)
    users: dict[str, UserFeatures] = {}
    items: dict[str, ItemFeatures] = {}
    for start in range(0, len(evs), batch):
        user_deltas, item_deltas = aggregate(evs[start : start + batch], half_life_ms)
        for user_id, ud in user_deltas.items():
            users[user_id] = merge_user(users.get(user_id), ud)
        for item_id, d in item_deltas.items():
            cur = items.get(item_id) or ItemFeatures()
            trending, last = decay_merge(
                cur.trending, cur.last_event_ts, d.trending, d.last_event_ts, half_life_ms
            )
            items[item_id] = ItemFeatures(
                views=cur.views + d.views,
                add_to_carts=cur.add_to_carts + d.add_to_carts,
                purchases=cur.purchases + d.purchases,
                trending=trending,
                last_event_ts=last,
            )
    return users, items


def training_features(df: pd.DataFrame) -> tuple[data.TrainingData, int]:
    """:func:`models.data.build` with the cut after the last event; one view per user at the cut
    makes every user part of the evaluation set, whose features are the user's at the cut."""
    until = int(df["ts"].max()) + 1
    users = sorted(df["user_id"].unique())
    probe = pd.DataFrame(
        {
            "event_id": [f"probe-{u}" for u in users],
            "user_id": users,
            "item_id": df["item_id"].iloc[0],
            "event_type": "view",
            "ts": until,
        }
    )
    return data.build(pd.concat([df, probe], ignore_index=True), until, min_item_count=1), until


def assert_agree(
    built: data.TrainingData, until: int, users: dict[str, UserFeatures], items: dict[str, ItemFeatures]
) -> None:
    ev = built.eval
    assert ev is not None and sorted(ev.user) == sorted(users)
    L = spec.RECENT_ITEMS_MAX
    assert ev.hist.shape[1] == L
    for k, user_id in enumerate(ev.user):
        f = users[user_id]
        hist = np.full(L, PAD, dtype=np.int64)
        hist[: len(f.recent_items)] = built.vocab.rows(f.recent_items)
        assert np.array_equal(ev.hist[k], hist), user_id
        serving = user_dense([[f.views, f.add_to_carts, f.purchases]], [(until - f.last_event_ts) / 1000.0])
        assert np.array_equal(ev.user_dense[k], serving[0]), user_id
    assert sorted(built.vocab.item_ids) == sorted(items)
    for item_id, f in items.items():
        stats = built.catalogue_stats[built.vocab.rows([item_id])[0]]
        assert list(stats[:3]) == [f.views, f.add_to_carts, f.purchases], item_id
        assert stats[3] == pytest.approx(f.trending, rel=1e-5), item_id


def test_training_and_serving_compute_the_same_features(events):
    built, until = training_features(events)
    users, items = serving_features(events)
    assert_agree(built, until, users, items)
    # the sequence exercises what matters: decay between events, users past the history cap
    assert any(
        f.trending not in (0.0, float(f.views + 3 * f.add_to_carts + 5 * f.purchases)) for f in items.values()
    )
    assert max(len(set(g)) for _, g in events.groupby("user_id")["item_id"]) > spec.RECENT_ITEMS_MAX


def test_both_sides_follow_the_shared_constants(events, monkeypatch):
    """Change the constants in feature_store.spec only: both sides follow, and still agree."""
    before_users, before_items = serving_features(events)
    monkeypatch.setattr(spec, "EVENT_WEIGHTS", {"view": 2, "add_to_cart": 7, "purchase": 11})
    monkeypatch.setattr(spec, "TRENDING_HALF_LIFE_S", 1_800.0)
    monkeypatch.setattr(spec, "RECENT_ITEMS_MAX", 5)
    built, until = training_features(events)
    users, items = serving_features(events)
    assert_agree(built, until, users, items)
    assert built.eval.hist.shape[1] == 5
    assert max(len(f.recent_items) for f in users.values()) == 5
    assert all(items[i].trending != pytest.approx(before_items[i].trending) for i in items)
    assert any(users[u].top_category_weights != before_users[u].top_category_weights for u in users)


# Module-level names that would be a second definition of a shared constant.
_SHARED = ("WEIGHT", "HALF_LIFE", "_MAX", "RECENT_ITEMS")


@pytest.mark.parametrize(
    "path",
    [
        "feature_store/values.py",
        "models/features.py",
        "models/data.py",
        "models/model.py",
        "services/stream/aggregate.py",
        "services/stream/config.py",
    ],
)
def test_no_module_defines_the_shared_constants_again(path):
    tree = ast.parse((ROOT / path).read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name):
                assert not any(s in target.id for s in _SHARED), (
                    f"{path}: {target.id} (use feature_store.spec)"
                )
