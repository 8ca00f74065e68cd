"""The stages of one micro-batch: features -> model inputs -> forward -> ranked responses.

``BatchEngine(queries, load)`` runs in a batcher worker thread:

1. fetch: one Redis pipeline for every user of the batch and every Rank candidate (cache misses);
2. candidates (Recommend only): the model generates them from the user's recent items, minus
   what the user purchased unless asked to keep them; their item features come from the cache
   or one more pipeline;
3. assemble one :class:`~models.inference.RankInput` per request;
4. forward: one ``Ranker.rank_batch`` for the whole batch, routed with the batcher's load;
5. encode: each request's top-k, best first, into its ``RankResponse``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.inference import RankInput, RankOutput
from services.ranking.encoding import encode_response
from services.ranking.errors import NoModel
from services.ranking.features import FeatureFetcher
from services.ranking.lifecycle import ModelSlot
from services.ranking.metrics import PATHS, STAGES, RankingMetrics
from services.ranking.validation import Query

log = logging.getLogger(__name__)

ItemStats = tuple[float, float, float, float]  # views, add_to_carts, purchases, trending
NO_STATS: ItemStats = (0.0, 0.0, 0.0, 0.0)  # unknown item, or none known while Redis is down


def item_stats_of(features: Any) -> ItemStats:
    """An ``ItemFeatures`` (or None) -> the four numbers the model reads; cached in this form."""
    if features is None:
        return NO_STATS
    return (
        float(features.views),
        float(features.add_to_carts),
        float(features.purchases),
        float(features.trending),
    )


def rank_input(user: Any, candidates: Sequence[str], stats: Any, now_ms: int) -> RankInput:
    """One request's model input from its user's features (None: cold or unknown) and item stats
    (the item catalogue, or a mapping item id -> :data:`ItemStats`)."""
    if user is None:
        recent: Sequence[str] = ()
        counts = (0.0, 0.0, 0.0)
        since = None
    else:
        recent = user.recent_items
        counts = (float(user.views), float(user.add_to_carts), float(user.purchases))
        last = user.last_event_ts
        since = None if not last else max(0.0, (now_ms - last) / 1000.0)
    if isinstance(stats, Mapping):
        get = stats.get
        table = np.array([get(c, NO_STATS) for c in candidates], dtype=np.float32).reshape(-1, 4)
    else:  # the item catalogue: one row gather
        table = stats.stats(candidates)
    return RankInput(recent, counts, since, candidates, table)


def encode(
    candidates: Sequence[str], scores: np.ndarray, top_k: int, path: str, version: str, degraded: bool
) -> bytes:
    """The response, serialized: the best ``top_k`` (0 = all) candidates, best first; ties keep
    request order (:func:`services.ranking.encoding.encode_response`)."""
    return encode_response(candidates, scores, top_k, path, version, degraded)


class BatchEngine:
    """The compute function the micro-batcher runs: queries in, one response (or error) per query out."""

    def __init__(
        self,
        fetcher: FeatureFetcher,
        models: ModelSlot,
        *,
        recommend_pool: int,
        metrics: RankingMetrics,
        tracing: Any = None,
    ) -> None:
        self._fetcher = fetcher
        self._tracing = tracing  # RankTracing or None: the stages become spans of the batch's span
        self._models = models
        self._pool = recommend_pool
        self._metrics = metrics
        # Label look-ups done once: each costs a lock and a dict walk per call otherwise.
        self._stages = {name: metrics.batch_seconds.labels(name) for name in STAGES}
        self._paths = {name: metrics.paths.labels(name) for name in PATHS}

    def __call__(self, queries: Sequence[Query], load: float) -> list[Any]:
        ranker = self._models.current  # the whole batch uses the model it started with
        if ranker is None:
            raise NoModel("no model version is loaded yet")
        stage = self._stages
        t0 = time.perf_counter()
        now_ms = time.time_ns() // 1_000_000
        user_ids = {q.user_id for q in queries}
        wanted = [c for q in queries if q.item_ids is not None for c in q.item_ids]
        fetched = self._fetcher.fetch(user_ids, wanted)
        t1 = time.perf_counter()
        stage["fetch"].observe(t1 - t0)

        candidates: list[Sequence[str]] = []
        degraded = [fetched.degraded] * len(queries)
        generated: list[int] = []
        for i, q in enumerate(queries):
            if q.item_ids is not None:
                candidates.append(q.item_ids)
                continue
            user = fetched.users.get(q.user_id)
            recent = user.recent_items if user is not None else ()
            exclude = None
            if user is not None and not q.include_purchased:
                exclude = set(getattr(user, "purchased_items", ()) or ())
            candidates.append(ranker.candidates(recent, max(self._pool, q.top_k), exclude))
            generated.append(i)
        stats = fetched.items
        if generated:
            extra = self._fetcher.fetch((), [c for i in generated for c in candidates[i]])
            stats = extra.items  # the same catalogue, now holding the generated candidates too
            if extra.degraded:
                for i in generated:
                    degraded[i] = True
        t2 = time.perf_counter()
        if generated:
            stage["candidates"].observe(t2 - t1)

        users = fetched.users
        inputs = [
            rank_input(users.get(q.user_id), c, stats, now_ms)
            for q, c in zip(queries, candidates, strict=True)
        ]
        t3 = time.perf_counter()
        stage["assemble"].observe(t3 - t2)
        outputs: list[RankOutput] = ranker.rank_batch(inputs, load=load)
        t4 = time.perf_counter()
        stage["forward"].observe(t4 - t3)

        responses = []
        paths = self._paths
        n_degraded = 0
        for q, c, out, bad in zip(queries, candidates, outputs, degraded, strict=True):
            responses.append(encode(c, out.scores, q.top_k, out.path, ranker.version, bad))
            paths[out.path].inc()
            n_degraded += bad
        if n_degraded:
            self._metrics.degraded.inc(n_degraded)
        t5 = time.perf_counter()
        stage["encode"].observe(t5 - t4)
        if self._tracing is not None:
            marks = [("fetch", t0, t1, {"recstack.users": len(user_ids), "recstack.items": len(wanted),
                                        "recstack.degraded": fetched.degraded})]  # fmt: skip
            if generated:
                marks.append(("candidates", t1, t2, {"recstack.generated_for": len(generated)}))
            marks.append(("assemble", t2, t3, {}))
            forward = {"recstack.model.version": ranker.version, "recstack.inputs": len(inputs)}
            marks.append(("forward", t3, t4, forward))
            marks.append(("encode", t4, t5, {"recstack.responses": len(responses),
                                             "recstack.degraded_responses": n_degraded}))  # fmt: skip
            self._tracing.stages(marks)
        return responses
