"""The offline truth: the features Redis must hold, computed from the distinct valid events published.

Kafka acknowledges each published event with its partition and offset. Replaying the acknowledged
events in offset order (one user's events share a partition, so that is the order the stream
applies them in), skipping every event id seen before, gives each user's and item's features as
docs/CONTRACT.md section 4 defines them. :func:`compare` then tells events lost (a count below the
truth) from events applied twice (a count above it) and any other difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from feature_store.spec import EVENT_WEIGHTS, RECENT_ITEMS_MAX
from feature_store.values import ItemFeatures, UserFeatures
from recstack.events import Event

_COUNT_FIELD = {"view": "views", "add_to_cart": "add_to_carts", "purchase": "purchases"}
COUNTS = tuple(_COUNT_FIELD.values())
# trending is merged batch by batch and stored as a Feast Float: rounding differs from one sum.
TRENDING_REL_TOL = 1e-3


@dataclass(frozen=True, slots=True)
class Acked:
    """One valid event as the broker acknowledged it."""

    partition: int
    offset: int
    event: Event


def expected_features(
    acked: Iterable[Acked], half_life_s: float
) -> tuple[dict[str, UserFeatures], dict[str, ItemFeatures]]:
    """Users' and items' features after applying each distinct event once, in offset order."""
    users: dict[str, UserFeatures] = {}
    items: dict[str, ItemFeatures] = {}
    seen: set[str] = set()
    half_life_ms = half_life_s * 1000.0
    for record in sorted(acked, key=lambda a: (a.partition, a.offset)):
        ev = record.event
        if ev.event_id in seen:
            continue
        seen.add(ev.event_id)
        count = _COUNT_FIELD[ev.event_type]
        user = users.setdefault(ev.user_id, UserFeatures())
        setattr(user, count, getattr(user, count) + 1)
        user.last_event_ts = max(user.last_event_ts, ev.ts_ms)
        if ev.item_id in user.recent_items:
            user.recent_items.remove(ev.item_id)
        user.recent_items.insert(0, ev.item_id)
        del user.recent_items[RECENT_ITEMS_MAX:]
        item = items.setdefault(ev.item_id, ItemFeatures())
        setattr(item, count, getattr(item, count) + 1)
        weight = float(EVENT_WEIGHTS[ev.event_type])
        # trending = sum of weight * 2^-(age / half-life), as of the newest event: order-independent
        if ev.ts_ms >= item.last_event_ts:
            decay = 2.0 ** (-(ev.ts_ms - item.last_event_ts) / half_life_ms) if item.last_event_ts else 0.0
            item.trending = item.trending * decay + weight
            item.last_event_ts = ev.ts_ms
        else:
            item.trending += weight * 2.0 ** (-(item.last_event_ts - ev.ts_ms) / half_life_ms)
    return users, items


@dataclass
class TruthCheck:
    """How the features read back compare with the truth."""

    events: int = 0  # distinct valid events the truth holds
    lost: int = 0  # events missing from the users' counts
    doubled: int = 0  # events counted more than once in the users' counts
    users: int = 0
    items: int = 0
    mismatched_users: list[str] = field(default_factory=list)
    mismatched_items: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.doubled or self.mismatched_users or self.mismatched_items)

    def summary(self) -> str:
        text = f"{self.events:,} events, {self.lost} lost, {self.doubled} applied twice"
        if self.mismatched_users or self.mismatched_items:
            text += (
                f", {len(self.mismatched_users)} users and {len(self.mismatched_items)} items differ"
                f" (e.g. {(self.mismatched_users + self.mismatched_items)[:3]})"
            )
        return text


def compare(
    expected_users: Mapping[str, UserFeatures],
    expected_items: Mapping[str, ItemFeatures],
    got_users: Mapping[str, UserFeatures | None],
    got_items: Mapping[str, ItemFeatures | None],
) -> TruthCheck:
    """Every expected entity against what was read (``None``: no features at all)."""
    check = TruthCheck(users=len(expected_users), items=len(expected_items))
    for user_id, want in expected_users.items():
        got = got_users.get(user_id) or UserFeatures()
        differs = False
        for name in COUNTS:
            expected, actual = getattr(want, name), getattr(got, name)
            check.events += expected
            check.lost += max(0, expected - actual)
            check.doubled += max(0, actual - expected)
            differs |= expected != actual
        differs |= want.last_event_ts != got.last_event_ts or want.recent_items != got.recent_items
        if differs:
            check.mismatched_users.append(user_id)
    for item_id, want_item in expected_items.items():
        got_item = got_items.get(item_id) or ItemFeatures()
        if (
            any(getattr(want_item, n) != getattr(got_item, n) for n in COUNTS)
            or want_item.last_event_ts != got_item.last_event_ts
            or not math.isclose(want_item.trending, got_item.trending, rel_tol=TRENDING_REL_TOL)
        ):
            check.mismatched_items.append(item_id)
    return check
