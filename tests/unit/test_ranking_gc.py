"""The garbage-collector tuning of the ranking server (services.ranking.gc_tuning)."""

from __future__ import annotations

import gc

import pytest

from services.ranking.gc_tuning import GcPauseRecorder, freeze_heap
from services.ranking.metrics import RankingMetrics


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()


def test_freeze_moves_live_objects_out_of_collections(unfrozen) -> None:
    keep = [[i] for i in range(10_000)]  # container objects the collector tracks
    frozen = freeze_heap(collect_first=True)
    assert frozen >= len(keep)
    # Frozen objects that die later leave the permanent generation (another thread may free some
    # meanwhile: threads of earlier tests in this process), so the count can only have shrunk.
    assert len(keep) <= gc.get_freeze_count() <= frozen
    # A full collection now only walks what was allocated after the freeze.
    tracked_after = len(gc.get_objects())
    assert tracked_after < frozen


def test_pause_recorder_observes_each_generation() -> None:
    metrics = RankingMetrics()
    recorder = GcPauseRecorder(metrics.gc_pause)
    recorder.install()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        recorder.uninstall()
    count = "recstack_ranking_gc_pause_seconds_count"
    assert metrics.value(count, {"generation": "0"}) >= 1
    assert metrics.value(count, {"generation": "2"}) >= 1
    before = metrics.value(count, {"generation": "2"})
    gc.collect(2)  # uninstalled: no longer observed
    assert metrics.value(count, {"generation": "2"}) == before
    assert recorder not in gc.callbacks
