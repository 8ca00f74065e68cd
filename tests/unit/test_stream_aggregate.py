"""Folding a batch of events into per-entity deltas, and merging deltas into stored features."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from feature_store.spec import EVENT_WEIGHTS, PURCHASED_ITEMS_MAX, RECENT_ITEMS_MAX
from recstack.events import Event
from services.stream.aggregate import aggregate

HALF_LIFE_MS = 3_600_000.0


def ev(i: int, user: str, item: str, kind: str = "view", ts: int = 1_000, category=None, price=None) -> Event:
    return Event(f"e{i}", user, item, kind, ts, price=price, category=category)


def test_counts_and_last_event_time_per_user_and_item():
    events = [
        ev(1, "u1", "a", "view", 10),
        ev(2, "u1", "a", "add_to_cart", 30),
        ev(3, "u1", "b", "purchase", 20),
        ev(4, "u2", "a", "view", 5),
    ]
    users, items = aggregate(events, HALF_LIFE_MS)
    u1 = users["u1"]
    assert (u1.views, u1.add_to_carts, u1.purchases, u1.last_event_ts) == (1, 1, 1, 30)
    assert (users["u2"].views, users["u2"].last_event_ts) == (1, 5)
    a = items["a"]
    assert (a.views, a.add_to_carts, a.purchases, a.last_event_ts) == (2, 1, 0, 30)
    assert items["b"].purchases == 1


def test_recent_items_are_distinct_newest_applied_first():
    events = [ev(i, "u", item, ts=100 - i) for i, item in enumerate(["a", "b", "a", "c", "b"])]
    users, _ = aggregate(events, HALF_LIFE_MS)
    # "newest" is arrival order, not event time (event times here go backwards)
    assert users["u"].recent_items == ["b", "c", "a"]


def test_recent_and_purchased_items_are_capped():
    events = [ev(i, "u", f"i{i}", "purchase") for i in range(PURCHASED_ITEMS_MAX + 30)]
    users, _ = aggregate(events, HALF_LIFE_MS)
    n = PURCHASED_ITEMS_MAX + 30
    assert users["u"].recent_items == [f"i{i}" for i in range(n - 1, n - 1 - RECENT_ITEMS_MAX, -1)]
    assert users["u"].purchased_items == [f"i{i}" for i in range(n - 1, n - 1 - PURCHASED_ITEMS_MAX, -1)]


def test_purchased_items_come_only_from_purchases():
    events = [ev(1, "u", "a", "view"), ev(2, "u", "b", "purchase"), ev(3, "u", "c", "add_to_cart")]
    users, _ = aggregate(events, HALF_LIFE_MS)
    assert users["u"].purchased_items == ["b"]


def test_category_weights_and_item_attributes():
    events = [
        ev(1, "u", "a", "view", category="shoes", price=10.0),
        ev(2, "u", "a", "purchase", category="shoes", price=12.5),
        ev(3, "u", "b", "add_to_cart", category="hats"),
        ev(4, "u", "c", "view"),
    ]
    users, items = aggregate(events, HALF_LIFE_MS)
    assert users["u"].category_weights == {"shoes": 1 + 5, "hats": 3}
    assert (items["a"].category, items["a"].price) == ("shoes", 12.5)
    assert (items["c"].category, items["c"].price) == (None, None)


def _offline_trending(events: list[Event]) -> tuple[float, int]:
    ref = max(e.ts_ms for e in events)
    return sum(EVENT_WEIGHTS[e.event_type] * 2 ** (-(ref - e.ts_ms) / HALF_LIFE_MS) for e in events), ref


@given(
    st.lists(
        st.tuples(st.sampled_from(["view", "add_to_cart", "purchase"]), st.integers(0, 20 * 3_600_000)),
        min_size=1,
        max_size=40,
    ),
    st.randoms(use_true_random=False),
)
@settings(max_examples=60)
def test_trending_is_the_decayed_sum_whatever_the_arrival_order(pairs, rnd: random.Random):
    events = [ev(i, "u", "x", kind, ts) for i, (kind, ts) in enumerate(pairs)]
    expected, ref = _offline_trending(events)
    shuffled = list(events)
    rnd.shuffle(shuffled)
    for batch in (events, shuffled):
        _, items = aggregate(batch, HALF_LIFE_MS)
        assert items["x"].last_event_ts == ref
        assert math.isclose(items["x"].trending, expected, rel_tol=1e-9)
