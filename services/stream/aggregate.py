"""Fold a batch of events into per-user and per-item deltas (pure logic, no I/O).

The deltas are what :meth:`feature_store.writes.FeatureWriter.apply` merges into the stored
features; the merge rules are in ``docs/FEATURES.md``. Events must come in the order they are
applied (per partition, by offset): "newest" in ``recent_items`` means last applied.
"""

from __future__ import annotations

from collections.abc import Iterable

from feature_store import spec
from feature_store.values import ItemDelta, UserDelta
from recstack.events import Event

_VIEW, _CART, _PURCHASE = "view", "add_to_cart", "purchase"


def aggregate(
    events: Iterable[Event], half_life_ms: float
) -> tuple[dict[str, UserDelta], dict[str, ItemDelta]]:
    """Events (in applied order) -> (user_id -> UserDelta, item_id -> ItemDelta)."""
    users: dict[str, list] = {}
    items: dict[str, list] = {}
    weights = spec.EVENT_WEIGHTS  # read per call: training and serving follow one definition
    for ev in events:
        kind = ev.event_type
        ts = ev.ts_ms
        weight = weights[kind]
        # user: [views, carts, purchases, last_ts, recent (ordered set), purchased, category weights]
        u = users.get(ev.user_id)
        if u is None:
            u = users[ev.user_id] = [0, 0, 0, ts, {}, {}, {}]
        # item: [views, carts, purchases, trending, ref_ts, category, price]
        it = items.get(ev.item_id)
        if it is None:
            it = items[ev.item_id] = [0, 0, 0, 0.0, ts, None, None]
        if kind == _VIEW:
            u[0] += 1
            it[0] += 1
        elif kind == _CART:
            u[1] += 1
            it[1] += 1
        else:
            u[2] += 1
            it[2] += 1
            purchased = u[5]
            purchased.pop(ev.item_id, None)
            purchased[ev.item_id] = None
        if ts > u[3]:
            u[3] = ts
        recent = u[4]
        recent.pop(ev.item_id, None)  # re-inserting moves the item to the newest end
        recent[ev.item_id] = None
        if ev.category:
            cats = u[6]
            cats[ev.category] = cats.get(ev.category, 0) + weight
            it[5] = ev.category
        if ev.price is not None:
            it[6] = ev.price
        ref = it[4]  # trending is kept as of the newest event time seen (see decay_merge)
        if ts > ref:
            it[3] = it[3] * 2.0 ** ((ref - ts) / half_life_ms) + weight
            it[4] = ts
        elif ts == ref:
            it[3] += weight
        else:
            it[3] += weight * 2.0 ** ((ts - ref) / half_life_ms)
    user_deltas = {
        user_id: UserDelta(
            views=u[0],
            add_to_carts=u[1],
            purchases=u[2],
            last_event_ts=u[3],
            recent_items=_newest_first(u[4], spec.RECENT_ITEMS_MAX),
            purchased_items=_newest_first(u[5], spec.PURCHASED_ITEMS_MAX),
            category_weights=u[6],
        )
        for user_id, u in users.items()
    }
    item_deltas = {
        item_id: ItemDelta(
            views=it[0],
            add_to_carts=it[1],
            purchases=it[2],
            trending=it[3],
            last_event_ts=it[4],
            category=it[5],
            price=it[6],
        )
        for item_id, it in items.items()
    }
    return user_deltas, item_deltas


def _newest_first(ordered: dict[str, None], cap: int) -> list[str]:
    out = []
    for item_id in reversed(ordered):
        out.append(item_id)
        if len(out) == cap:
            break
    return out
