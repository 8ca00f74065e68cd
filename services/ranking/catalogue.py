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

Values are stored as the rows of one float32 matrix, in the form the model reads
(``transform(ItemFeatures | None)``: four numbers), so a request gathers its candidates' rows with
one dictionary look-up each and one fancy index (:meth:`stats`). Row 0 is the unknown item. While
Redis is down the catalogue keeps serving what it holds (stale beats nothing); the refresher
retries. Readers (the batch workers, the event loop) never lock: a row is written before its index
entry, and a grown matrix is swapped in before any entry points past the old one. Writers (the
refresher, a batch that read a missing item) take a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import redis

from feature_store.changes import latest_id, read_item_changes
from feature_store.reads import read_features
from feature_store.values import ItemFeatures
from services.ranking.metrics import RankingMetrics

log = logging.getLogger(__name__)

RESYNC_CHUNK = 1_000  # items per pipeline when re-reading everything
WIDTH = 4  # views, add_to_carts, purchases, trending (services.ranking.engine.ItemStats)


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
        self._index: dict[str, int] = {}  # item id -> its row of _matrix
        self._matrix = np.zeros((1024, WIDTH), dtype=np.float32)  # row 0: the unknown item
        self._rows = 1
        self._write = threading.Lock()
        self._last_id: bytes | None = None  # the feed entry read last; None: not started on the feed
        self._next_resync = clock() + resync_interval_s
        self._preload: list[str] = []
        self._lock = threading.Lock()  # guards _preload
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_refresh = clock()  # clock() of the last refresh that reached Redis
        self._metrics.catalogue_age.set_function(lambda: self._clock() - self.last_refresh)

    # --- request side --------------------------------------------------------------------------
    @property
    def held(self) -> dict[str, int]:
        """Item id -> row: ``item_id in catalogue.held`` tells whether the catalogue has it."""
        return self._index

    def __len__(self) -> int:
        return len(self._index)

    def get(self, item_id: str, default: Any = None) -> Any:
        """One item's four numbers as a tuple (``default`` when not held)."""
        row = self._index.get(item_id)
        return default if row is None else tuple(float(x) for x in self._matrix[row])

    def stats(self, item_ids: Sequence[str]) -> np.ndarray:
        """``len(item_ids) x 4`` float32: each item's row, zeros for an item not held."""
        index = self._index
        rows = [index.get(i, 0) for i in item_ids]  # look-ups first, then the matrix (see above)
        return self._matrix[rows]

    def add(self, item_ids: Sequence[str], rows: Sequence[ItemFeatures | None]) -> None:
        """Hold (or update) items just read (``None``: Redis has no features for it yet)."""
        transform = self._transform
        values = np.asarray([transform(row) for row in rows], dtype=np.float32).reshape(-1, WIDTH)
        with self._write:
            index = self._index
            if len(index) + len(item_ids) > self._max_items:
                # rare (a catalogue past max_items): start afresh, items come back as needed
                index = self._index = {}
                self._matrix = np.zeros((1024, WIDTH), dtype=np.float32)
                self._rows = 1
            fresh = [i for i in item_ids if i not in index]
            if self._rows + len(fresh) > self._matrix.shape[0]:
                grown = np.zeros((2 * (self._rows + len(fresh)), WIDTH), dtype=np.float32)
                grown[: self._rows] = self._matrix[: self._rows]
                self._matrix = grown  # swapped in before any index entry points past the old one
            matrix = self._matrix
            new_rows: dict[str, int] = {}
            for item_id in fresh:
                new_rows[item_id] = self._rows
                self._rows += 1
            targets = [index.get(i) or new_rows[i] for i in item_ids]
            matrix[targets] = values
            index.update(new_rows)
        self._metrics.catalogue_items.set(len(index))

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
            read += self._read([i for i in dict.fromkeys(preload) if i not in self._index], "preload")
        if self._last_id is None:
            self._last_id = latest_id(self._stream)  # earlier changes are in what we read
        changes = read_item_changes(self._stream, self._last_id)
        self._last_id = changes.last_id
        now = self._clock()
        if changes.gap or now >= self._next_resync:
            if changes.gap:
                log.info("item change feed has a gap: re-reading all %d catalogue items", len(self._index))
            self._next_resync = now + self._resync_s
            read += self._read(list(self._index), "resync")
        else:
            index = self._index
            read += self._read([i for i in changes.item_ids if i in index], "changed")
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
