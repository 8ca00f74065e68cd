"""Training data from events: temporal split without leakage, features as the stream computes them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from feature_store.spec import EVENT_WEIGHTS, RECENT_ITEMS_MAX, TRENDING_HALF_LIFE_S
from models import data
from models.features import item_dense, user_dense
from models.metrics import hit_and_ndcg
from models.model import FullPathConfig, ItemEmbeddingConfig, RankerConfig, TwoPathRanker
from models.train import TrainConfig, fit
from models.vocab import OOV, PAD
from recstack.errors import UserError
from recstack.sources import synthetic


@pytest.fixture(autouse=True)
def one_thread():
    # Small ops: a second thread only adds waiting on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return synthetic(4_000, n_users=60, n_items=50, seed=3)


def cut_of(events: pd.DataFrame, q: float = 0.7) -> int:
    return int(events["ts"].quantile(q))


def tiny(vocab_rows: int) -> TwoPathRanker:
    cfg = RankerConfig(
        ItemEmbeddingConfig(num_rows=vocab_rows, dim=8), full=FullPathConfig(attention_dim=4, mlp_hidden=(8,))
    )
    return TwoPathRanker(cfg)


def test_only_events_before_until_are_used(events):
    T = cut_of(events)
    built = data.build(events, T)
    before = data.build(events[events["ts"] < T], T)
    assert (built.contexts.ts < T).all()
    assert built.vocab.item_ids == before.vocab.item_ids
    for name in ("hist", "user_dense", "snapshot", "pos_ptr", "pos_rows", "ts"):
        assert np.array_equal(getattr(built.contexts, name), getattr(before.contexts, name)), name
    assert np.array_equal(built.snapshots, before.snapshots)
    assert np.array_equal(built.catalogue_stats, before.catalogue_stats)
    assert before.eval is None and built.eval is not None and len(built.eval) > 0


def test_model_trained_with_until_never_saw_later_events(events):
    """Same seed, with and without every event at/after T: bit-identical weights."""
    T = cut_of(events)
    later_only_item = events.iloc[-1:].assign(item_id="only-after-cut", event_id="late-1", ts=T + 1)
    with_future = pd.concat([events, later_only_item], ignore_index=True)
    states = []
    for frame in (with_future, events[events["ts"] < T]):
        built = data.build(frame, T)
        assert "only-after-cut" not in built.vocab
        torch.manual_seed(0)
        model = tiny(len(built.vocab))
        fit(model, built, TrainConfig(epochs=1, batch_size=32, seed=0), progress=False)
        states.append(model.state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


def test_user_features_are_from_strictly_earlier_events(events):
    T = cut_of(events)
    built = data.build(events, T)
    c = built.contexts
    train = events[events["ts"] < T]
    rng = np.random.default_rng(0)
    for g in rng.choice(len(c), 40, replace=False):
        user = built.user_ids[c.user[g]]
        t = c.ts[g]
        past = train[(train["user_id"] == user) & (train["ts"] < t)]
        counts = [(past["event_type"] == k).sum() for k in ("view", "add_to_cart", "purchase")]
        since = (t - past["ts"].max()) / 1000.0 if len(past) else np.nan
        assert np.allclose(c.user_dense[g], user_dense(np.array([counts]), np.array([since]))[0], atol=1e-5)
        recent: list[str] = []
        for item in past["item_id"][::-1]:  # newest first, distinct
            if item not in recent:
                recent.append(item)
        expected = built.vocab.rows(recent[:RECENT_ITEMS_MAX])
        got = c.hist[g][c.hist[g] != PAD]
        assert list(got) == list(expected)
        now = train[(train["user_id"] == user) & (train["ts"] == t)]
        want = sorted(set(built.vocab.rows(now["item_id"])) - {OOV})
        assert sorted(c.positives(g)) == want


def test_item_counters_come_from_events_before_the_context(events):
    T = cut_of(events)
    built = data.build(events, T)
    c = built.contexts
    train = events[events["ts"] < T]
    bucket_ms = built.summary["snapshot_bucket_hours"] * 3_600_000
    t0 = int(train["ts"].iloc[0])
    for g in np.random.default_rng(1).choice(len(c), 20, replace=False):
        boundary = t0 + c.snapshot[g] * bucket_ms
        assert boundary <= c.ts[g]
        past = train[train["ts"] < boundary]
        item = built.vocab.item_ids[0]
        rows = past[past["item_id"] == item]
        trend, last = 0.0, None
        for t, kind in zip(rows["ts"], rows["event_type"], strict=True):
            trend = (
                trend * (2.0 ** (-(t - last) / (TRENDING_HALF_LIFE_S * 1000))) if last is not None else trend
            )
            trend += EVENT_WEIGHTS[kind]
            last = t
        raw = [(rows["event_type"] == k).sum() for k in ("view", "add_to_cart", "purchase")] + [trend]
        expected = item_dense(np.array([raw]))[0]
        assert np.allclose(built.snapshots[c.snapshot[g], 2], expected, atol=1e-4)


def test_duplicate_event_ids_count_once(events):
    T = cut_of(events)
    doubled = pd.concat([events, events.iloc[:500]], ignore_index=True)
    a, b = data.build(events, T), data.build(doubled, T)
    assert b.summary["duplicate_event_ids"] == 500
    assert np.array_equal(a.contexts.user_dense, b.contexts.user_dense)
    assert np.array_equal(a.catalogue_stats, b.catalogue_stats)


def test_eval_set_is_next_instant_after_cut(events):
    T = cut_of(events)
    built = data.build(events, T)
    ev = built.eval
    later = events[events["ts"] >= T]
    for k in range(min(10, len(ev))):
        user_events = later[later["user_id"] == ev.user[k]]
        first = user_events[user_events["ts"] == user_events["ts"].min()]
        want = sorted(set(built.vocab.rows(first["item_id"])) - {OOV})
        assert sorted(ev.targets(k)) == want


def test_until_errors_name_the_flag(events):
    with pytest.raises(UserError, match="--until"):
        data.parse_until("yesterday")
    with pytest.raises(UserError, match="--until"):
        data.build(events, int(events["ts"].min()))


def test_hit_and_ndcg_by_hand():
    top = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    hits, ndcg = hit_and_ndcg(top, [np.array([6, 99])])
    assert hits[0] == 1.0
    assert ndcg[0] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    hits, ndcg = hit_and_ndcg(top, [np.array([99])])
    assert hits[0] == 0.0 and ndcg[0] == 0.0
