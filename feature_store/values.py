"""Feature values of one user or item and the rules that update them: plain Python, no Feast.

This module exists so that configuration, aggregation, training and tests can use the types
without importing Feast, which takes seconds (:mod:`feature_store.layout` adds the Redis layout).
The caps, weights and half-life are in :mod:`feature_store.spec`, read at call time so that
training and serving follow one definition. ``docs/FEATURES.md`` explains each feature and rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from feature_store import spec


@dataclass(slots=True)
class UserFeatures:
    """The ``user_activity`` view of one user; the defaults are what an unknown user has."""

    views: int = 0
    add_to_carts: int = 0
    purchases: int = 0
    last_event_ts: int = 0  # epoch ms of the newest applied event
    recent_items: list[str] = field(default_factory=list)  # newest first, <= spec.RECENT_ITEMS_MAX
    purchased_items: list[str] = field(default_factory=list)  # newest first, <= spec.PURCHASED_ITEMS_MAX
    top_categories: list[str] = field(default_factory=list)  # highest weight first
    top_category_weights: list[int] = field(default_factory=list)  # aligned with top_categories
    written_at_ms: int = 0  # when the stream last wrote this hash (Feast's event timestamp)


@dataclass(slots=True)
class ItemFeatures:
    """The ``item_popularity`` view of one item; the defaults are what an unknown item has."""

    views: int = 0
    add_to_carts: int = 0
    purchases: int = 0
    trending: float = 0.0  # decayed weighted event count as of last_event_ts
    last_event_ts: int = 0  # epoch ms of the newest applied event
    category: str = ""  # "" = never seen
    price: float = 0.0  # 0.0 = never seen
    written_at_ms: int = 0

    def trending_at(self, now_ms: int, half_life_s: float | None = None) -> float:
        """``trending`` decayed from ``last_event_ts`` to ``now_ms`` (an earlier time changes nothing);
        ``half_life_s`` defaults to :data:`feature_store.spec.TRENDING_HALF_LIFE_S`."""
        if now_ms <= self.last_event_ts:
            return self.trending
        if half_life_s is None:
            half_life_s = spec.TRENDING_HALF_LIFE_S
        return self.trending * 2.0 ** (-(now_ms - self.last_event_ts) / (half_life_s * 1000.0))


@dataclass(slots=True)
class UserDelta:
    """What one batch adds to a user (:func:`merge_user` says how)."""

    views: int = 0
    add_to_carts: int = 0
    purchases: int = 0
    last_event_ts: int = 0
    recent_items: list[str] = field(default_factory=list)  # distinct, newest (last applied) first
    purchased_items: list[str] = field(default_factory=list)  # distinct, newest first
    category_weights: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class ItemDelta:
    """What one batch adds to an item; ``trending`` is the batch's own decayed sum as of ``last_event_ts``."""

    views: int = 0
    add_to_carts: int = 0
    purchases: int = 0
    trending: float = 0.0
    last_event_ts: int = 0
    category: str | None = None  # last one seen in the batch
    price: float | None = None  # last one seen in the batch


def decay_merge(
    score_a: float, ts_a: int, score_b: float, ts_b: int, half_life_ms: float
) -> tuple[float, int]:
    """Two decayed sums (each as of its own time) -> their sum as of the later time.

    Order-independent: merging events one by one in any order gives the same
    ``sum(weight * 2 ** -((t_ref - t_event) / half_life))`` with ``t_ref`` the newest event time.
    The merge script applies the same rule to the stored ``trending``.
    """
    if ts_b >= ts_a:
        return score_a * 2.0 ** (-(ts_b - ts_a) / half_life_ms) + score_b, ts_b
    return score_a + score_b * 2.0 ** (-(ts_a - ts_b) / half_life_ms), ts_a


def merge_recent(new: Sequence[str], old: Sequence[str], cap: int) -> list[str]:
    """``new`` (newest first) followed by the entries of ``old`` not in it, distinct, at most ``cap``."""
    out = list(dict.fromkeys(new))[:cap]
    if len(out) < cap and old:
        fresh = set(out)
        for x in old:
            if x not in fresh:
                fresh.add(x)
                out.append(x)
                if len(out) == cap:
                    break
    return out


def merge_user(current: UserFeatures | None, delta: UserDelta) -> UserFeatures:
    """The user's features after one batch's delta (``docs/FEATURES.md``, "update rules")."""
    base = current if current is not None else UserFeatures()
    if delta.category_weights:
        weights = dict(zip(base.top_categories, base.top_category_weights, strict=False))
        for category, weight in delta.category_weights.items():
            weights[category] = weights.get(category, 0) + weight
        ranked = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))[: spec.TOP_CATEGORIES_MAX]
        categories = [c for c, _ in ranked]
        category_weights = [w for _, w in ranked]
    else:
        categories, category_weights = base.top_categories, base.top_category_weights
    return UserFeatures(
        views=base.views + delta.views,
        add_to_carts=base.add_to_carts + delta.add_to_carts,
        purchases=base.purchases + delta.purchases,
        last_event_ts=max(base.last_event_ts, delta.last_event_ts),
        recent_items=merge_recent(delta.recent_items, base.recent_items, spec.RECENT_ITEMS_MAX),
        purchased_items=(
            merge_recent(delta.purchased_items, base.purchased_items, spec.PURCHASED_ITEMS_MAX)
            if delta.purchased_items
            else base.purchased_items
        ),
        top_categories=categories,
        top_category_weights=category_weights,
        written_at_ms=base.written_at_ms,
    )
