"""Returning shoppers: the users a benchmark's Rank requests name, checked against the feature store.

A user with no history takes the ranking server's light path, which costs far less than the
full one, so a benchmark that drew its users from the data set alone would flatter the server.
Before the first step, the candidate users' features are read from Redis through the project's
own reader (:func:`feature_store.reads.read_features`), and only users with at least
``min_recent_items`` recent items are kept.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from feature_store.reads import read_features
from feature_store.values import UserFeatures
from recstack.errors import UserError

MIN_USERS = 50  # fewer returning shoppers than this and the request mix is too narrow to mean much
READ_CHUNK = 1_000  # users per Redis pipeline


@dataclass(frozen=True)
class Shoppers:
    """The users kept and how they were chosen."""

    users: list[str]
    checked: int  # candidate users whose features were read
    min_recent_items: int
    median_recent_items: float | None  # over the users kept

    def summary(self) -> dict[str, Any]:
        return {
            "users": len(self.users),
            "checked": self.checked,
            "min_recent_items": self.min_recent_items,
            "median_recent_items": self.median_recent_items,
        }


def select_returning(
    user_ids: Sequence[str], features: Sequence[UserFeatures | None], min_recent_items: int
) -> Shoppers:
    """The users of ``user_ids`` whose ``features`` (aligned; ``None``: no features) hold at least
    ``min_recent_items`` recent items."""
    if len(user_ids) != len(features):
        raise ValueError(f"{len(user_ids)} users but {len(features)} feature rows")
    kept: list[str] = []
    counts: list[int] = []
    for user, row in zip(user_ids, features, strict=True):
        n = len(row.recent_items) if row is not None else 0
        if row is not None and n >= min_recent_items:
            kept.append(user)
            counts.append(n)
    median = float(statistics.median(counts)) if counts else None
    return Shoppers(kept, len(user_ids), min_recent_items, median)


def read_returning(
    client: Any,
    user_ids: Sequence[str],
    min_recent_items: int,
    *,
    min_users: int = MIN_USERS,
    where: str = "Redis",
) -> Shoppers:
    """Read the users' features with ``client`` (redis-py, bytes responses) and keep the returning
    shoppers; a :class:`UserError` saying how to stream features in when fewer than ``min_users``."""
    features: list[UserFeatures | None] = []
    try:
        for start in range(0, len(user_ids), READ_CHUNK):
            users, _ = read_features(client, user_ids[start : start + READ_CHUNK], [])
            features.extend(users)
    except Exception as exc:  # any redis-py failure: say where and why, not a traceback
        raise UserError(f"cannot read the users' features from {where}: {exc}") from None
    shoppers = select_returning(user_ids, features, min_recent_items)
    if len(shoppers.users) < min_users:
        raise UserError(
            f"only {len(shoppers.users)} of {len(user_ids)} users have at least {min_recent_items} recent "
            f"items in the features at {where}; the benchmark needs {min_users} such returning shoppers. "
            "Stream the features in first: `make demo KEEP=1` does it (replay Online Retail through Kafka "
            "into the stream consumer), or run `recstack stream --redis URL ...` and then "
            "`recstack replay --source onlineretail --rate 0` (docs/LOADTESTS.md, 'Preparing the ranking "
            "servers'); --min-recent-items 0 skips this check."
        )
    return shoppers
