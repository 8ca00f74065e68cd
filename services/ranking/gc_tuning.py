"""Keep Python's cyclic garbage collector out of the latency budget.

A serving process holds ~300,000 long-lived objects (torch, Feast, grpc, the model) that never
become garbage. A full (generation 2) collection still walks all of them: ~60-150 ms on this
machine, i.e. every request in flight misses a 10 ms p99. Full collections are rare but not
rare enough: the item-feature cache alone promotes a few thousand objects per second, which
triggers one every few tens of seconds under load.

:func:`freeze_heap` moves everything alive into the collector's permanent generation
(``gc.freeze``), so later collections only walk what was allocated since: once at start-up
after a full collection (the server is not serving yet), and after each model swap without
one (a full collection then would pause serving; the previous model is freed by reference
counting, its few cycles stay frozen).

:class:`GcPauseRecorder` times every collection into ``recstack_ranking_gc_pause_seconds`` so
an operator sees what the collector still costs.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def freeze_heap(*, collect_first: bool) -> int:
    """Freeze every live object (after a full collection when ``collect_first``); returns how
    many objects the permanent generation holds."""
    if collect_first:
        gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d objects frozen", frozen)
    return frozen


class GcPauseRecorder:
    """Observes each collection's duration, per generation, into a histogram with a
    ``generation`` label. Process-wide: install once per server, uninstall when it stops."""

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram
        self._started = 0.0
        self._installed = False

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            self._histogram.labels(str(info["generation"])).observe(time.perf_counter() - self._started)
            self._started = 0.0

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self)
            self._installed = False
