"""ItemCatalogue: the features of every item the server ranks, in process, at a bounded staleness.

A request reads its user's hash from Redis and nothing else: its candidates' features are here.
An item enters the catalogue the first time a batch needs it (read in that batch's pipeline, like
the user), or when a model version is loaded (its whole vocabulary, in the background), and then
stays fresh without a request ever waiting for it:

* every ``refresh_interval_s`` (default 250 ms) a background thread reads the item change feed
  (:mod:`feature_store.changes`: the ids the stream consumer announces after each applied batch)
  and re-reads only the items that changed and that the catalogue holds. Its cost follows the
  stream's rate, not the catalogue's size or the request rate;
* every ``resync_interval_s`` (default 60 s), and whenever the feed has a gap (the thread fell
  behind its cap, or Redis lost its data), it re-reads every item it holds, in chunks: that bounds
  the staleness of a change whose announcement was lost with a consumer that died in between.

Values are stored in the form the model reads (``transform(ItemFeatures | None)``). While Redis
is down the catalogue keeps serving what it holds (stale beats nothing); the refresher retries.
Readers are the batch workers and the event loop; the writer is the refresher thread. Single dict
operations are atomic under the GIL, so readers never lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis

from feature_store.changes import latest_id, read_item_changes
from feature_store.online import ItemFeatures, read_features
from services.ranking.metrics import RankingMetrics

log = logging.getLogger(__name__)

RESYNC_CHUNK = 1_000  # items per pipeline when re-reading everything


class ItemCatalogue:
    def __init__(
        self,
        stream_client: Any,
        feature_client: Any,
        *,
        transform: Callable[[ItemFeatures | None], Any],
        refresh_interval_s: float = 0.25,
        resync_interval_s: float = 60.0,
        max_items: int = 200_000,
        metrics: RankingMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream_client  # redis-py (single or cluster): reads the change feed
        self._features = feature_client  # the lean pipelined transport: reads item hashes
        self._transform = transform
        self._refresh_s = refresh_interval_s
        self._resync_s = resync_interval_s
        self._max_items = max_items
        self._metrics = metrics or RankingMetrics()
        self._clock = clock
        self.values: dict[str, Any] = {}
        self._last_id: bytes | None = None  # the feed entry read last; None: not started on the feed
        self._next_resync = clock() + resync_interval_s
        self._preload: list[str] = []
        self._lock = threading.Lock()  # guards _preload
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_refresh = clock()  # clock() of the last refresh that reached Redis
        self._metrics.catalogue_age.set_function(lambda: self._clock() - self.last_refresh)

    # --- request side --------------------------------------------------------------------------
    def add(self, item_ids: Sequence[str], rows: Sequence[ItemFeatures | None]) -> None:
        """Hold items a batch has just read (``None``: Redis has no features for it yet)."""
        values = self.values
        if len(values) + len(item_ids) > self._max_items:
            values.clear()  # rare (a catalogue past max_items); the items come back as needed
        transform = self._transform
        for item_id, row in zip(item_ids, rows, strict=True):
            values[item_id] = transform(row)
        self._metrics.catalogue_items.set(len(values))

    def preload(self, item_ids: Iterable[str]) -> None:
        """Read ``item_ids`` in the background (a model's vocabulary when it is loaded)."""
        with self._lock:
            self._preload.extend(item_ids)

    # --- background ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="item-catalogue", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stop.wait(self._refresh_s):
            try:
                self.refresh()
            except (redis.RedisError, OSError) as exc:
                self._metrics.catalogue_refresh_failures.inc()
                log.debug("item catalogue refresh failed: %s", exc)
            except Exception:  # never let the refresher die: the catalogue would freeze
                log.exception("item catalogue refresh failed")

    def refresh(self) -> int:
        """One round: preload, then the changed items (or all of them when due); returns items read."""
        started = time.perf_counter()
        with self._lock:
            preload, self._preload = self._preload, []
        read = 0
        if preload:
            read += self._read([i for i in dict.fromkeys(preload) if i not in self.values], "preload")
        if self._last_id is None:
            self._last_id = latest_id(self._stream)  # earlier changes are in what we read
        changes = read_item_changes(self._stream, self._last_id)
        self._last_id = changes.last_id
        now = self._clock()
        if changes.gap or now >= self._next_resync:
            if changes.gap:
                log.info("item change feed has a gap: re-reading all %d catalogue items", len(self.values))
            self._next_resync = now + self._resync_s
            read += self._read(list(self.values), "resync")
        else:
            values = self.values
            read += self._read([i for i in changes.item_ids if i in values], "changed")
        self.last_refresh = self._clock()
        self._metrics.catalogue_refresh_seconds.observe(time.perf_counter() - started)
        return read

    def _read(self, item_ids: list[str], why: str) -> int:
        for lo in range(0, len(item_ids), RESYNC_CHUNK):
            chunk = item_ids[lo : lo + RESYNC_CHUNK]
            _, rows = read_features(self._features, (), chunk)
            self.add(chunk, rows)
        if item_ids:
            self._metrics.catalogue_reads.labels(why).inc(len(item_ids))
        return len(item_ids)
