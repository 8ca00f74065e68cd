"""Update rules of the features (``feature_store.values``): pure logic, no Redis, no Feast."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from feature_store.spec import PURCHASED_ITEMS_MAX, RECENT_ITEMS_MAX, TOP_CATEGORIES_MAX
from feature_store.values import (
    ItemFeatures,
    UserDelta,
    UserFeatures,
    decay_merge,
    merge_recent,
    merge_user,
)

HALF_LIFE_MS = 3_600_000.0
item_ids = st.text(alphabet="abcdefgh", min_size=1, max_size=2)


@given(st.lists(item_ids, max_size=60), st.lists(item_ids, max_size=60, unique=True), st.integers(1, 60))
def test_merge_recent_puts_new_first_then_old_distinct_and_capped(new, old, cap):
    out = merge_recent(new, old, cap)
    expected = list(dict.fromkeys(list(dict.fromkeys(new)) + old))[:cap]
    assert out == expected
    assert len(out) == len(set(out)) <= cap


def test_merge_user_adds_counts_keeps_newest_time_and_moves_items_to_the_front():
    current = UserFeatures(
        views=3,
        add_to_carts=1,
        purchases=0,
        last_event_ts=500,
        recent_items=["a", "b", "c"],
        purchased_items=["z"],
        top_categories=["shoes", "hats"],
        top_category_weights=[4, 2],
        written_at_ms=99,
    )
    delta = UserDelta(
        views=1,
        purchases=1,
        last_event_ts=400,
        recent_items=["c", "d"],
        purchased_items=["c"],
        category_weights={"hats": 3, "bags": 1},
    )
    merged = merge_user(current, delta)
    assert (merged.views, merged.add_to_carts, merged.purchases) == (4, 1, 1)
    assert merged.last_event_ts == 500  # an older event does not move it back
    assert merged.recent_items == ["c", "d", "a", "b"]
    assert merged.purchased_items == ["c", "z"]
    assert merged.top_categories == ["hats", "shoes", "bags"]  # 5, 4, 1
    assert merged.top_category_weights == [5, 4, 1]
    assert merged.written_at_ms == 99
    assert current.views == 3  # the input is left as it was


def test_merge_user_from_nothing_and_caps():
    delta = UserDelta(
        views=200,
        recent_items=[f"i{k}" for k in range(RECENT_ITEMS_MAX + 5)],
        purchased_items=[f"i{k}" for k in range(PURCHASED_ITEMS_MAX + 5)],
        category_weights={f"c{k:02d}": 1 for k in range(TOP_CATEGORIES_MAX + 4)},
    )
    merged = merge_user(None, delta)
    assert merged.views == 200
    assert len(merged.recent_items) == RECENT_ITEMS_MAX
    assert len(merged.purchased_items) == PURCHASED_ITEMS_MAX
    # ties broken by name, the tail beyond the cap dropped
    assert merged.top_categories == [f"c{k:02d}" for k in range(TOP_CATEGORIES_MAX)]


def test_a_delta_without_purchases_or_categories_leaves_them_as_they_were():
    current = UserFeatures(purchased_items=["p"], top_categories=["c"], top_category_weights=[7])
    merged = merge_user(current, UserDelta(views=1, recent_items=["x"]))
    assert merged.purchased_items == ["p"]
    assert (merged.top_categories, merged.top_category_weights) == (["c"], [7])


events = st.lists(st.tuples(st.integers(1, 5), st.integers(0, 30 * 3_600_000)), min_size=1, max_size=30)


@given(events, st.integers(0, 29))
def test_decay_merge_of_two_partial_sums_is_the_sum_over_all_events(pairs, split):
    def partial(part):
        ref = max(ts for _, ts in part)
        return sum(w * 2 ** (-(ref - ts) / HALF_LIFE_MS) for w, ts in part), ref

    split = min(split, len(pairs) - 1)
    left, right = pairs[: split + 1], pairs[split + 1 :]
    total, ref = partial(pairs)
    if right:
        merged, merged_ref = decay_merge(*partial(left), *partial(right), HALF_LIFE_MS)
        merged_back, _ = decay_merge(*partial(right), *partial(left), HALF_LIFE_MS)
        assert merged_ref == ref
        assert math.isclose(merged, total, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(merged_back, total, rel_tol=1e-9, abs_tol=1e-12)


def test_trending_at_decays_to_now_and_never_grows():
    item = ItemFeatures(trending=8.0, last_event_ts=1_000)
    assert item.trending_at(1_000 + 3_600_000, half_life_s=3600) == 4.0
    assert item.trending_at(0, half_life_s=3600) == 8.0
