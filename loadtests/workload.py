"""Who shops and what they see: users, items and storefront categories taken from a data set.

Requests use real user and item ids (Online Retail by default), so the ranking server's feature
reads hit keys the stream consumer wrote. Warm users are customers with at least two purchases;
candidates are drawn from the items that may be recommended (:mod:`recstack.catalogue`: postage,
fees, manual adjustments and vouchers are left out). Online Retail has no categories, so a category
is the first two characters of the stock code (a product family), with small families pooled into
``other``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recstack.catalogue import is_recommendable
from recstack.v1 import ranking_pb2

MIN_USER_EVENTS = 2
MIN_CATEGORY_ITEMS = 150
OTHER_CATEGORY = "other"


@dataclass(frozen=True)
class Workload:
    """``users``: warm user ids; ``items``: candidate item ids; ``categories``: name -> item ids."""

    users: list[str]
    items: list[str]
    categories: dict[str, list[str]]

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(asdict(self)))
        return out

    @classmethod
    def read(cls, path: str | Path) -> Workload:
        data: dict[str, Any] = json.loads(Path(path).read_text())
        return cls(users=data["users"], items=data["items"], categories=data["categories"])


def from_events(frame: Any, *, stock_codes: bool = True) -> Workload:
    """A workload from an event frame with ``user_id`` and ``item_id`` columns (pandas).

    Items are those that may be recommended (:func:`recstack.catalogue.is_recommendable`).
    ``stock_codes``: item ids are Online Retail stock codes, whose categories are their two-character
    families. Otherwise the ``category`` column gives the categories where it is filled.
    """
    user_counts = frame.loc[~frame["user_id"].str.startswith("guest-"), "user_id"].value_counts()
    users = sorted(user_counts[user_counts >= MIN_USER_EVENTS].index.tolist())
    items = sorted(str(x) for x in frame["item_id"].unique().tolist() if is_recommendable(str(x)))
    if not users or not items:
        raise ValueError("the events hold no warm users or no sellable items")
    if stock_codes or "category" not in frame or frame["category"].isna().all():
        return Workload(users=users, items=items, categories=categorize(items))
    pairs = frame.loc[frame["category"].notna(), ["item_id", "category"]].drop_duplicates("item_id")
    categories: dict[str, list[str]] = {}
    for item, category in zip(pairs["item_id"], pairs["category"], strict=True):
        categories.setdefault(str(category), []).append(str(item))
    return Workload(
        users=users, items=items, categories={k: sorted(v) for k, v in sorted(categories.items())}
    )


def categorize(items: list[str]) -> dict[str, list[str]]:
    """Category name -> items: stock-code families (first two characters), small families pooled."""
    families: dict[str, list[str]] = {}
    for item in items:
        families.setdefault(item[:2], []).append(item)
    categories: dict[str, list[str]] = {}
    for family, members in sorted(families.items()):
        key = family if len(members) >= MIN_CATEGORY_ITEMS else OTHER_CATEGORY
        categories.setdefault(key, []).extend(members)
    return categories


def load(source: str = "onlineretail") -> Workload:
    """``onlineretail`` | ``otto`` | ``synthetic`` | an event log path (see :mod:`recstack.sources`)."""
    from recstack.sources import load_source

    return from_events(load_source(source), stock_codes=source == "onlineretail")


def rank_requests(
    workload: Workload, count: int, candidates: int, seed: int = 0, top_k: int = 0
) -> list[bytes]:
    """``count`` serialized ``RankRequest``s: a random warm user and ``candidates`` distinct items each.

    Serialized once up front, so the generator spends no time building messages while it runs.
    """
    rng = np.random.default_rng(seed)
    n_items = len(workload.items)
    size = min(candidates, n_items)
    out = []
    for _ in range(count):
        user = workload.users[int(rng.integers(len(workload.users)))]
        picks = rng.choice(n_items, size=size, replace=False)
        request = ranking_pb2.RankRequest(
            user_id=user, item_ids=[workload.items[i] for i in picks], top_k=top_k
        )
        out.append(request.SerializeToString())
    return out


def recommend_requests(workload: Workload, count: int, k: int = 20, seed: int = 0) -> list[bytes]:
    """``count`` serialized ``RecommendRequest``s for random warm users."""
    rng = np.random.default_rng(seed)
    return [
        ranking_pb2.RecommendRequest(
            user_id=workload.users[int(rng.integers(len(workload.users)))], k=k
        ).SerializeToString()
        for _ in range(count)
    ]


def synthetic_workload(n_users: int = 200, n_items: int = 1_200) -> Workload:
    """A small made-up workload for tests: stock-code-like ids in eight families."""
    items = sorted(f"{10 + i % 8}{i // 8:04d}" for i in range(n_items))
    return Workload(users=[f"u{i}" for i in range(n_users)], items=items, categories=categorize(items))
