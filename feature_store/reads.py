"""Reads of the online store for ranking: every hash of a request in one round trip.

The layout and the decoding are in :mod:`feature_store.layout`; the ranking service calls
:func:`read_features` over its own lean transport (:mod:`services.ranking.redis_client`) or
redis-py, the stream's tests and tools over redis-py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from feature_store.layout import ITEM_FIELDS, USER_FIELDS, decode_item, decode_user, item_key, user_key
from feature_store.values import ItemFeatures, UserFeatures


def read_features(
    client: Any, user_ids: Sequence[str], item_ids: Sequence[str]
) -> tuple[list[UserFeatures | None], list[ItemFeatures | None]]:
    """Users' and items' features in ONE non-transactional pipeline (one round trip).

    ``client`` is a ``redis.Redis`` with bytes responses (``decode_responses=False``). ``None``
    stands for an entity with no features yet (cold start).
    """
    pipe = client.pipeline(transaction=False)
    for user_id in user_ids:
        pipe.hmget(user_key(user_id), USER_FIELDS)
    for item_id in item_ids:
        pipe.hmget(item_key(item_id), ITEM_FIELDS)
    replies = pipe.execute()
    n_users = len(user_ids)
    users = [decode_user(r) for r in replies[:n_users]]
    items = [decode_item(r) for r in replies[n_users:]]
    return users, items
