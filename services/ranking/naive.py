"""The naive baseline (``recstack serve --naive``): the yardstick of every ranking speed figure.

What a straightforward service does: per call, Feast's ``FeatureStore.get_online_features`` for
the user and then for the candidates, the fp32 model, always the full path, no batching, no
cache. Same gRPC surface, validation and model hot reload as the real server. Kept plain on
purpose: it is the yardstick, not a path to tune.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from feature_store.definitions import ITEM_VIEW, USER_VIEW
from feature_store.layout import ITEM_FEATURES, USER_FEATURES
from feature_store.values import ItemFeatures, UserFeatures
from services.ranking.backend import ModelOwner
from services.ranking.config import RankingConfig
from services.ranking.encoding import encode_response, new_request_id
from services.ranking.engine import item_stats_of, rank_input
from services.ranking.errors import NoModel
from services.ranking.metrics import RankingMetrics
from services.ranking.validation import Query

_USER_REFS = [f"{USER_VIEW}:{name}" for name in USER_FEATURES]
_ITEM_REFS = [f"{ITEM_VIEW}:{name}" for name in ITEM_FEATURES]


def read_user_feast(store: Any, user_id: str) -> UserFeatures | None:
    """One user's ``user_activity`` through Feast; None when Feast has no row for them."""
    row = store.get_online_features(features=_USER_REFS, entity_rows=[{"user_id": user_id}]).to_dict()
    if all(row[name][0] is None for name in USER_FEATURES):
        return None
    values = {name: row[name][0] for name in USER_FEATURES}
    return UserFeatures(
        views=values["views"] or 0,
        add_to_carts=values["add_to_carts"] or 0,
        purchases=values["purchases"] or 0,
        last_event_ts=values["last_event_ts"] or 0,
        recent_items=list(values["recent_items"] or ()),
        purchased_items=list(values["purchased_items"] or ()),
        top_categories=list(values["top_categories"] or ()),
        top_category_weights=list(values["top_category_weights"] or ()),
    )


def read_items_feast(store: Any, item_ids: Sequence[str]) -> list[ItemFeatures | None]:
    """The candidates' ``item_popularity`` through Feast, in order; None for items Feast does not know."""
    if not item_ids:
        return []
    rows = store.get_online_features(
        features=_ITEM_REFS, entity_rows=[{"item_id": i} for i in item_ids]
    ).to_dict()
    out: list[ItemFeatures | None] = []
    for k in range(len(item_ids)):
        if all(rows[name][k] is None for name in ITEM_FEATURES):
            out.append(None)
            continue
        out.append(
            ItemFeatures(
                views=rows["views"][k] or 0,
                add_to_carts=rows["add_to_carts"][k] or 0,
                purchases=rows["purchases"][k] or 0,
                trending=rows["trending"][k] or 0.0,
                last_event_ts=rows["last_event_ts"][k] or 0,
            )
        )
    return out


class NaiveBackend(ModelOwner):
    # A few threads, as a thread-per-request server would have; Feast's reads block.
    WORKERS = 4

    def __init__(self, config: RankingConfig, metrics: RankingMetrics) -> None:
        super().__init__(config, metrics, quantized=False)
        self._store: Any = None
        self._workers = ThreadPoolExecutor(max_workers=self.WORKERS, thread_name_prefix="rank-naive")

    async def start(self, on_model: Callable[[Any], None] | None = None) -> None:
        from feature_store.store import open_store

        loop = asyncio.get_running_loop()
        self._store = await loop.run_in_executor(self._workers, open_store, self.config.redis_url)
        await self.start_models(on_model)

    async def stop(self) -> None:
        await self.stop_models()
        self._workers.shutdown(wait=True)

    async def serve(self, query: Query, timeout_s: float | None) -> Any:
        self.require_model()
        return await asyncio.get_running_loop().run_in_executor(self._workers, self._serve_one, query)

    def _serve_one(self, query: Query) -> Any:
        ranker = self.models.current
        if ranker is None:
            raise NoModel("no model version is loaded yet")
        user = read_user_feast(self._store, query.user_id)
        if query.item_ids is not None:
            candidates: Sequence[str] = query.item_ids
        else:
            recent = user.recent_items if user is not None else ()
            exclude = None if user is None or query.include_purchased else set(user.purchased_items)
            candidates = ranker.candidates(recent, max(self.config.recommend_pool, query.top_k), exclude)
        items = read_items_feast(self._store, candidates)
        stats = {c: item_stats_of(f) for c, f in zip(candidates, items, strict=True)}
        inp = rank_input(user, candidates, stats, time.time_ns() // 1_000_000)
        (out,) = ranker.rank_batch([inp], force_path="full")
        self.metrics.paths.labels(out.path).inc()
        return encode_response(
            candidates, out.scores, query.top_k, out.path, ranker.version, False, new_request_id()
        )
