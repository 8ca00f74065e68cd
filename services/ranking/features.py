"""FeatureFetcher: the features of a whole micro-batch in one Redis round trip, and what to do without Redis.

* One non-transactional pipeline per batch reads every user's hash, and the hash of any
  candidate the in-process item catalogue does not hold yet
  (:func:`feature_store.reads.read_features`, over the lean transport of
  :mod:`services.ranking.redis_client`). User features are always read fresh.
* Item features come from the :class:`~services.ranking.catalogue.ItemCatalogue`, which a
  background thread keeps within ``item_refresh_ms`` of Redis from the stream's item change
  feed: a warm batch reads only its users.
* Every read has a short socket timeout. A failure or timeout marks Redis down: that batch
  and the following ones are served at once with default user features and whatever item
  features the catalogue holds (stale is better than nothing), flagged ``degraded``. A
  background probe (never a request) pings Redis and marks it up again when it answers.

Runs in the batcher's worker threads (or on the event loop for a lone request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from feature_store.reads import read_features
from feature_store.values import ItemFeatures, UserFeatures
from recstack import redis_url as redis_urls
from recstack.credentials import REDIS_PASSWORD_SETTINGS, is_auth_error
from services.ranking.catalogue import ItemCatalogue
from services.ranking.metrics import RankingMetrics
from services.ranking.redis_client import ClusterPipelinedRedis, PipelinedRedis
from services.ranking.tasks import cancel_and_wait

log = logging.getLogger(__name__)


def _client(redis_url: str, timeout_s: float) -> PipelinedRedis | ClusterPipelinedRedis:
    """The lean pipelined transport: one server, or every node of a Redis Cluster a batch touches."""
    if redis_urls.is_cluster(redis_url):
        return ClusterPipelinedRedis(redis_url, timeout_s)
    return PipelinedRedis(redis_url, timeout_s)


@dataclass(slots=True)
class BatchFeatures:
    users: dict[str, UserFeatures | None]  # None: unknown user (cold start) or Redis down
    # item id -> item_transform(ItemFeatures, or None: unknown item or no data while Redis is down)
    items: Any  # the ItemCatalogue: .stats(ids) -> rows, .get(id, default) -> one item's numbers
    degraded: bool


class FeatureFetcher:
    def __init__(
        self,
        redis_url: str,
        *,
        timeout_s: float = 0.020,
        item_refresh_s: float = 0.25,
        item_resync_s: float = 60.0,
        item_cache_max_items: int = 200_000,
        retry_interval_s: float = 0.5,
        metrics: RankingMetrics | None = None,
        item_transform: Callable[[ItemFeatures | None], Any] = lambda features: features,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = redis_url
        self._timeout = timeout_s
        # Fails fast (short timeouts, no retries): the fetcher's own fallback is the retry policy.
        self._client = _client(redis_url, timeout_s)
        self._retry_interval = retry_interval_s
        self._metrics = metrics or RankingMetrics()
        self._hits = self._metrics.item_cache.labels("hit")
        self._misses = self._metrics.item_cache.labels("miss")
        self._clock = clock
        # Items are held in the form the caller uses (converted once per read, not per request).
        self.catalogue = ItemCatalogue(
            redis_urls.connect(redis_url, socket_timeout=max(timeout_s, 1.0), socket_connect_timeout=1.0),
            self._client,
            transform=item_transform,
            refresh_interval_s=item_refresh_s,
            resync_interval_s=item_resync_s,
            max_items=item_cache_max_items,
            metrics=self._metrics,
            clock=clock,
        )
        self._up = True
        self._probe: asyncio.Task | None = None

    @property
    def redis_up(self) -> bool:
        return self._up

    # --- hot path (worker threads, or the event loop for a lone request) -------------------------
    def fetch(self, user_ids: Collection[str], item_ids: Iterable[str]) -> BatchFeatures:
        """Features of ``user_ids`` (always read) and ``item_ids`` (read only when not held yet).

        ``items`` of the result is the catalogue itself (its rows are what the batch reads); an item
        Redis does not know has ``transform(None)``."""
        catalogue = self.catalogue
        held = catalogue.held
        wanted = set(item_ids)
        missing = [i for i in wanted if i not in held]
        if missing:
            self._misses.inc(len(missing))
        if len(wanted) > len(missing):
            self._hits.inc(len(wanted) - len(missing))
        users_list = list(user_ids)
        if not self._up:
            return BatchFeatures(dict.fromkeys(users_list), catalogue, True)
        try:
            user_rows, item_rows = read_features(self._client, users_list, missing)
        except (redis.RedisError, OSError) as exc:
            self._mark_down(exc)
            return BatchFeatures(dict.fromkeys(users_list), catalogue, True)
        if missing:
            catalogue.add(missing, item_rows)
        return BatchFeatures(dict(zip(users_list, user_rows, strict=True)), catalogue, False)

    def _mark_down(self, exc: Exception) -> None:
        self._metrics.redis_failures.inc()
        if self._up:
            self._up = False
            hint = f"; check {REDIS_PASSWORD_SETTINGS}" if is_auth_error(exc) else ""
            log.warning(
                "Redis feature read failed (%s)%s; serving degraded until it answers again", exc, hint
            )

    # --- recovery (event loop, background) -----------------------------------------------------
    def _ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except (redis.RedisError, OSError):
            return False

    async def _probe_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._retry_interval)
            if self._up:
                continue
            if await loop.run_in_executor(None, self._ping):
                self._up = True
                log.info("Redis answers again; feature reads resume")

    def start(self) -> None:
        self._probe = asyncio.get_running_loop().create_task(self._probe_forever(), name="redis-probe")
        self.catalogue.start()

    async def stop(self) -> None:
        await cancel_and_wait(self._probe)
        self.catalogue.stop()
        self._client.close()
