"""Request validation: a protobuf request in, a typed query out, or :class:`InvalidArgument` naming the field.

Runs on the event loop for every call, so the checks use C-level builtins over the id list
and only walk it in Python to name the offending index once something is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.ranking.config import MAX_ID_LENGTH
from services.ranking.errors import InvalidArgument


@dataclass(slots=True)
class Query:
    """One validated request. ``item_ids`` is None for Recommend (the server generates candidates)."""

    user_id: str
    item_ids: list[str] | None
    top_k: int  # Rank: 0 = all; Recommend: how many to return (> 0)
    include_purchased: bool = False


def _check_id(field: str, value: str) -> None:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(field, f"is {len(value)} characters, at most {MAX_ID_LENGTH} allowed")


def validate_rank(request, max_candidates: int) -> Query:  # request: ranking_pb2.RankRequest
    _check_id("user_id", request.user_id)
    ids = list(request.item_ids)
    if not ids:
        raise InvalidArgument("item_ids", "needs at least one candidate")
    if len(ids) > max_candidates:
        raise InvalidArgument("item_ids", f"has {len(ids)} candidates, at most {max_candidates} allowed")
    lengths = list(map(len, ids))
    if min(lengths) == 0 or max(lengths) > MAX_ID_LENGTH:
        for i, item_id in enumerate(ids):
            _check_id(f"item_ids[{i}]", item_id)
    if request.top_k < 0:
        raise InvalidArgument("top_k", f"must be zero (all) or more, got {request.top_k}")
    return Query(request.user_id, ids, request.top_k)


def validate_recommend(request, max_k: int, default_k: int) -> Query:  # ranking_pb2.RecommendRequest
    _check_id("user_id", request.user_id)
    if request.k < 0:
        raise InvalidArgument("k", f"must be zero (the default, {default_k}) or more, got {request.k}")
    if request.k > max_k:
        raise InvalidArgument("k", f"is {request.k}, at most {max_k} allowed")
    return Query(request.user_id, None, request.k or default_k, request.include_purchased)
