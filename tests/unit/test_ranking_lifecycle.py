"""Model hot reload: newest valid version wins, bad versions are refused once, the current keeps serving."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services.ranking.lifecycle import ModelSlot, ModelWatcher
from services.ranking.metrics import RankingMetrics


class FakeRanker:
    def __init__(self, version: str) -> None:
        self.version = version


def _watcher(
    tmp_path: Path, bad: set[str], loads: list[str]
) -> tuple[ModelWatcher, ModelSlot, RankingMetrics]:
    def list_versions(root: Path) -> list[Path]:
        return sorted(p for p in root.iterdir() if p.is_dir())

    def load(version_dir: Path) -> FakeRanker:
        loads.append(version_dir.name)
        if version_dir.name in bad:
            raise ValueError("checksum mismatch")
        return FakeRanker(version_dir.name)

    slot, metrics = ModelSlot(), RankingMetrics()
    watcher = ModelWatcher(
        tmp_path,
        slot,
        list_versions=list_versions,
        load=load,
        executor=ThreadPoolExecutor(1),
        metrics=metrics,
    )
    return watcher, slot, metrics


def test_newest_valid_version_is_served_and_bad_ones_refused_once(tmp_path):
    bad: set[str] = {"v3"}
    loads: list[str] = []
    watcher, slot, metrics = _watcher(tmp_path, bad, loads)
    swapped: list[str] = []
    watcher.on_swap = lambda r: swapped.append(r.version)

    async def main():
        assert not await watcher.check_now()  # empty folder: nothing to serve yet
        assert slot.current is None
        (tmp_path / "v1").mkdir()
        (tmp_path / "v2").mkdir()
        assert await watcher.check_now()
        assert slot.version == "v2"  # the newest, not every version in turn
        (tmp_path / "v3").mkdir()  # broken
        assert not await watcher.check_now()
        assert slot.version == "v2"
        assert not await watcher.check_now()  # refused versions are not retried
        (tmp_path / "v4").mkdir()
        assert await watcher.check_now()
        assert slot.version == "v4"

    asyncio.run(main())
    assert loads == ["v2", "v3", "v4"]
    assert swapped == ["v2", "v4"]
    assert watcher.refused == {"v3"}
    assert metrics.value("recstack_ranking_model_reloads_total", {"result": "failure"}) == 1
    assert metrics.value("recstack_ranking_model_reloads_total", {"result": "success"}) == 2
    assert metrics.value("recstack_ranking_model_info", {"version": "v4"}) == 1


def test_at_start_a_broken_newest_version_falls_back_to_the_previous(tmp_path):
    loads: list[str] = []
    watcher, slot, _ = _watcher(tmp_path, {"v2"}, loads)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    asyncio.run(watcher.check_now())
    assert slot.version == "v1"
    assert loads == ["v2", "v1"]


def test_missing_models_folder_is_waited_for(tmp_path):
    watcher, slot, _ = _watcher(tmp_path / "not-yet", set(), [])
    assert watcher.poll_once() is None
    (tmp_path / "not-yet" / "v1").mkdir(parents=True)
    asyncio.run(watcher.check_now())
    assert slot.version == "v1"
