"""The stages of one micro-batch: features -> model inputs -> forward -> ranked responses.

``BatchEngine(queries, load)`` runs in a batcher worker thread:

1. fetch: one Redis pipeline for every user of the batch and every Rank candidate (cache misses);
2. candidates (Recommend only): the model generates them from the user's recent items, minus
   what the user purchased unless asked to keep them; their item features come from the cache
   or one more pipeline;
3. assemble one :class:`~models.inference.RankInput` per request;
4. forward: one ``Ranker.rank_batch`` for the whole batch, routed with the batcher's load;
5. encode: each request's top-k, best first, into its ``RankResponse``, with a fresh request id.

With an experiment running (:mod:`services.ranking.experiments`) each user's arm picks the model
version: the batch runs one forward pass per version present in it, and a shadow arm scores the
whole batch afterwards (:meth:`BatchEngine.shadow`), only when the batcher has nothing waiting.
With impressions on, every answer becomes one impression (:mod:`services.ranking.impressions`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from models.inference import RankInput, RankOutput
from services.ranking.encoding import encode_ranked, encode_response, new_request_id, ranked_order
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


class BatchResults(list):
    """The batch's responses, plus the work to do once they are sent (``followup(spare)``, run by
    the batcher: shadow scoring when it has spare capacity, then the batch's impressions)."""

    __slots__ = ("followup",)


class BatchEngine:
    """The compute function the micro-batcher runs: queries in, one response (or error) per query out."""

    def __init__(
        self,
        fetcher: FeatureFetcher,
        models: ModelSlot,
        *,
        recommend_pool: int,
        metrics: RankingMetrics,
        experiments: Any = None,
        impressions: Any = None,
        shadow_cpu_share: float = 1.0,
        tracing: Any = None,
    ) -> None:
        self._fetcher = fetcher
        self._tracing = tracing  # RankTracing or None: the stages become spans of the batch's span
        self._models = models
        # .current: the running experiment's Routing, or None (services.ranking.experiments).
        self._experiments = experiments
        self._impressions = impressions  # an ImpressionPublisher, or None (impressions off)
        # The shadow may spend at most this share of the CPU the rest of the process spent;
        # past it a batch gets no shadow work at all (decided here, before any hand-off).
        self._shadow_budget = ShadowBudget(shadow_cpu_share)
        self._pool = recommend_pool
        self._metrics = metrics
        # Label look-ups done once: each costs a lock and a dict walk per call otherwise.
        self._stages = {name: metrics.batch_seconds.labels(name) for name in STAGES}
        self._paths = {name: metrics.paths.labels(name) for name in PATHS}
        self._over_budget = metrics.shadow_batches.labels("over_budget")

    def __call__(self, queries: Sequence[Query], load: float) -> list[Any]:
        ranker = self._models.current  # the whole batch uses the model it started with
        if ranker is None:
            raise NoModel("no model version is loaded yet")
        routing = self._experiments.current if self._experiments is not None else None
        # A shadow's ranking goes to the impressions only: without them it does not run. Over its
        # CPU budget the batch is answered as if there were no shadow: no follow-up, no hop.
        shadowed = routing is not None and routing.shadow is not None and self._impressions is not None
        if shadowed and not self._shadow_budget.allows():
            self._over_budget.inc()
            shadowed = False
        # Per request: its arm's name and ranker (the default one where its version was refused).
        arms: list[str] | None = None
        rankers: list[Any] | None = None
        if routing is not None:
            arms, rankers = routing.route(queries, ranker)
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
            generator = ranker if rankers is None else rankers[i]
            candidates.append(generator.candidates(recent, max(self._pool, q.top_k), exclude))
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
        if rankers is None:
            outputs: list[RankOutput] = ranker.rank_batch(inputs, load=load)
        else:
            outputs = _forward_by_version(rankers, inputs, load)
        t4 = time.perf_counter()
        stage["forward"].observe(t4 - t3)

        responses = BatchResults()
        paths = self._paths
        n_degraded = 0
        publisher = self._impressions
        shown: list[tuple] | None = [] if publisher is not None else None
        experiment = "" if routing is None else routing.experiment.name  # one string per batch
        for i, (q, c, out, bad) in enumerate(zip(queries, candidates, outputs, degraded, strict=True)):
            request_id = new_request_id()
            arm = "" if arms is None else arms[i]
            version = ranker.version if rankers is None else rankers[i].version
            if shown is None:
                responses.append(
                    encode_response(c, out.scores, q.top_k, out.path, version, bad, request_id, arm)
                )
            else:
                body, ids = encode_ranked(c, out.scores, q.top_k, out.path, version, bad, request_id, arm)
                responses.append(body)
                shown.append((request_id, q.user_id, arm, version, ids, now_ms, experiment))
            paths[out.path].inc()
            n_degraded += bad
        if n_degraded:
            self._metrics.degraded.inc(n_degraded)
        if shadowed:
            responses.followup = partial(self.shadow, routing.shadow, queries, inputs, shown)  # type: ignore[union-attr]
        elif shown:
            publisher.offer_many(shown)  # type: ignore[union-attr]
        t5 = time.perf_counter()
        stage["encode"].observe(t5 - t4)
        if self._tracing is not None:
            marks = [("fetch", t0, t1, {"recstack.users": len(user_ids), "recstack.items": len(wanted),
                                        "recstack.degraded": fetched.degraded})]  # fmt: skip
            if generated:
                marks.append(("candidates", t1, t2, {"recstack.generated_for": len(generated)}))
            marks.append(("assemble", t2, t3, {}))
            versions = ranker.version if rankers is None else ",".join(sorted({r.version for r in rankers}))
            forward = {"recstack.model.version": versions, "recstack.inputs": len(inputs)}
            marks.append(("forward", t3, t4, forward))
            marks.append(("encode", t4, t5, {"recstack.responses": len(responses),
                                             "recstack.degraded_responses": n_degraded}))  # fmt: skip
            self._tracing.stages(marks)
        return responses

    def shadow(
        self, shadow: Any, queries: Sequence[Query], inputs: list[RankInput], shown: list | None, spare: bool
    ) -> None:
        """After the batch's answers are sent (and only for a batch within the shadow's CPU budget):
        the shadow version scores the same inputs, only with ``spare`` capacity (else the work is
        dropped, counted), then the impressions go out, each with the shadow's ranking when it
        ran. Never touches an answer."""
        metrics = self._metrics
        rankings: list[list[str]] | None = None
        if not spare:
            metrics.shadow_batches.labels("dropped").inc()
        else:
            cpu0 = time.thread_time()
            try:
                outputs = shadow.ranker.rank_batch(inputs, load=0.0)
                rankings = [
                    [inp.candidates[j] for j in ranked_order(out.scores, q.top_k).tolist()]
                    for q, inp, out in zip(queries, inputs, outputs, strict=True)
                ]
                metrics.shadow_batches.labels("scored").inc()
            except Exception:  # a failing shadow costs its own work only
                log.exception("shadow version %s failed to score a batch", shadow.version)
                metrics.shadow_batches.labels("failed").inc()
            self._shadow_budget.charge(time.thread_time() - cpu0)
        if shown:
            if rankings is not None:
                version = shadow.version
                shown = [(*rec, (version, ids)) for rec, ids in zip(shown, rankings, strict=True)]
            self._impressions.offer_many(shown)  # type: ignore[union-attr]


class ShadowBudget:
    """The shadow arm's CPU allowance: at most ``share`` of the CPU the rest of the process spent
    (every thread: gRPC, the event loop, the live batches), counted over windows of ``window_s``
    so that a busy spell, when the shadow was dropped, does not bank a burst of shadow work."""

    def __init__(
        self,
        share: float,
        window_s: float = 5.0,
        cpu: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.share = share
        self._window_s = window_s
        self._cpu, self._clock = cpu, clock
        self._ends = -1.0
        self._cpu0 = 0.0
        self._spent = 0.0

    def allows(self) -> bool:
        cpu, now = self._cpu(), self._clock()
        if now >= self._ends:  # a new window: nothing spent yet, by either side
            self._ends, self._cpu0, self._spent = now + self._window_s, cpu, 0.0
        live = cpu - self._cpu0 - self._spent
        return self._spent <= self.share * live

    def charge(self, seconds: float) -> None:
        """CPU the shadow's scoring took (its thread's time)."""
        self._spent += seconds


def _forward_by_version(rankers: list[Any], inputs: list[RankInput], load: float) -> list[RankOutput]:
    """One forward pass per model version present in the batch, outputs back in request order."""
    first = rankers[0]
    if all(r is first for r in rankers):
        return first.rank_batch(inputs, load=load)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rankers):
        groups.setdefault(id(r), []).append(i)
    outputs: list[Any] = [None] * len(inputs)
    for members in groups.values():
        ranker = rankers[members[0]]
        for i, out in zip(members, ranker.rank_batch([inputs[i] for i in members], load=load), strict=True):
            outputs[i] = out
    return outputs
