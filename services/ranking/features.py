"""FeatureFetcher: the features of a whole micro-batch in one Redis round trip, and what to do without Redis.

* One non-transactional pipeline per batch reads every user's hash and every candidate item
  hash not in the item cache (:func:`feature_store.online.read_features`, over the lean
  transport of :mod:`services.ranking.redis_client`).
* Item features change slowly: a small in-process cache keeps them ``item_cache_ttl_s``
  (unknown items too, so a cold item costs one read per TTL). User features are always fresh.
* Every read has a short socket timeout. A failure or timeout marks Redis down: that batch
  and the following ones are served at once with default user features and whatever item
  features the cache still holds (stale is better than nothing), flagged ``degraded``. A
  background probe (never a request) pings Redis and marks it up again when it answers.

Runs in the batcher's worker threads; the cache is a plain dict whose single operations the
GIL keeps consistent (a race costs at most a redundant read).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from feature_store.online import ItemFeatures, UserFeatures, read_features
from recstack import redis_url as redis_urls
from recstack.credentials import REDIS_PASSWORD_SETTINGS, is_auth_error
from services.ranking.metrics import RankingMetrics
from services.ranking.redis_client import ClusterPipelinedRedis, PipelinedRedis

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
    items: dict[str, Any]
    degraded: bool


class FeatureFetcher:
    def __init__(
        self,
        redis_url: str,
        *,
        timeout_s: float = 0.020,
        item_cache_ttl_s: float = 1.0,
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
        self._ttl = item_cache_ttl_s
        self._cache_max = item_cache_max_items
        self._retry_interval = retry_interval_s
        self._metrics = metrics or RankingMetrics()
        self._clock = clock
        # Items are cached in the form the caller uses (converted once per read, not per request).
        self._transform = item_transform
        self._unknown_item = item_transform(None)
        # item id -> (expires at, transformed features; an item Redis does not know is cached too)
        self._items: dict[str, tuple[float, Any]] = {}
        self._up = True
        self._probe: asyncio.Task | None = None

    @property
    def redis_up(self) -> bool:
        return self._up

    # --- hot path (worker threads) -------------------------------------------------------------
    def fetch(self, user_ids: Collection[str], item_ids: Iterable[str]) -> BatchFeatures:
        """Features of ``user_ids`` (always read) and ``item_ids`` (from the cache when fresh)."""
        now = self._clock()
        items: dict[str, ItemFeatures | None] = {}
        missing: list[str] = []
        cache = self._items
        for item_id in set(item_ids):
            cached = cache.get(item_id)
            if cached is not None and (cached[0] > now or not self._up):
                items[item_id] = cached[1]
            else:
                missing.append(item_id)
        hits = len(items)
        if hits:
            self._metrics.item_cache.labels("hit").inc(hits)
        if missing:
            self._metrics.item_cache.labels("miss").inc(len(missing))
        users_list = list(user_ids)
        if not self._up:
            return self._fallback(users_list, items, missing)
        try:
            user_rows, item_rows = read_features(self._client, users_list, missing)
        except (redis.RedisError, OSError) as exc:
            self._mark_down(exc)
            return self._fallback(users_list, items, missing)
        expires = now + self._ttl
        if len(cache) + len(missing) > self._cache_max:
            cache.clear()  # rare; simpler and cheaper than LRU bookkeeping on every hit
        transform = self._transform
        for item_id, row in zip(missing, item_rows, strict=True):
            value = transform(row)
            items[item_id] = value
            cache[item_id] = (expires, value)
        return BatchFeatures(dict(zip(users_list, user_rows, strict=True)), items, False)

    def _fallback(self, user_ids: list[str], items: dict, missing: list[str]) -> BatchFeatures:
        """Default user features; items from the cache even when expired, else unknown."""
        cache, unknown = self._items, self._unknown_item
        for item_id in missing:
            cached = cache.get(item_id)
            items[item_id] = unknown if cached is None else cached[1]
        return BatchFeatures(dict.fromkeys(user_ids), items, True)

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

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            try:
                await self._probe
            except asyncio.CancelledError:
                pass
        self._client.close()
