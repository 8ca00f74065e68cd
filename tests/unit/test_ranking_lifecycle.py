"""Model hot reload: newest valid version wins, bad versions are refused once, the current keeps serving."""

from __future__ import annotations

import asyncio
import json
import shutil
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


def _published_under_another_name(tmp_path: Path) -> Path:
    """A real version whose folder name differs from the version its config.json records."""
    import numpy as np
    import torch

    from models.artifacts import publish_version
    from models.model import FullPathConfig, ItemEmbeddingConfig, RankerConfig, TwoPathRanker
    from models.vocab import ItemVocab

    torch.manual_seed(0)
    vocab = ItemVocab([f"item-{i}" for i in range(20)])
    model = TwoPathRanker(
        RankerConfig(
            ItemEmbeddingConfig(len(vocab), 8), full=FullPathConfig(attention_dim=4, mlp_hidden=(8,))
        )
    )
    stats = np.zeros((len(vocab), 4), np.float32)
    published = publish_version(tmp_path, model.eval(), vocab, stats, {}, version="v20260101-000000")
    promoted = published.rename(tmp_path / "v20260102-000000")  # e.g. promoted from staging by mv
    assert json.loads((promoted / "config.json").read_text())["version"] == "v20260101-000000"
    return promoted


def test_a_version_published_under_another_folder_name_is_swapped_in_once(tmp_path):
    from models.artifacts import list_versions, load_version

    promoted = _published_under_another_name(tmp_path)
    loads: list[str] = []
    swapped: list[str] = []

    def load(version_dir: Path):
        loads.append(version_dir.name)
        return load_version(version_dir, quantized=False)

    slot, metrics = ModelSlot(), RankingMetrics()
    watcher = ModelWatcher(
        tmp_path,
        slot,
        list_versions=list_versions,
        load=load,
        executor=ThreadPoolExecutor(1),
        interval_s=0.02,
        metrics=metrics,
        on_swap=lambda r: swapped.append(r.version),
    )

    async def main():
        watcher.start()
        await asyncio.sleep(0.5)  # ~25 polls
        # A copy under a newer name is a new version: swapped in once, then left alone.
        shutil.copytree(promoted, tmp_path / ".tmp-copy")
        (tmp_path / ".tmp-copy").rename(tmp_path / "v20260103-000000")
        await asyncio.sleep(0.5)
        await watcher.stop()

    asyncio.run(main())
    assert loads == ["v20260102-000000", "v20260103-000000"]
    # One identity for a version: its folder name, in responses and metrics as well.
    assert swapped == ["v20260102-000000", "v20260103-000000"]
    assert slot.version == "v20260103-000000"
    assert metrics.value("recstack_ranking_model_reloads_total", {"result": "success"}) == 2
    assert metrics.value("recstack_ranking_model_info", {"version": "v20260103-000000"}) == 1


def test_default_pointer_wins_over_the_newest_and_a_bad_pointer_keeps_the_served_version(tmp_path, caplog):
    from models.artifacts import read_default

    bad: set[str] = {"v3"}
    loads: list[str] = []
    watcher, slot, metrics = _watcher(tmp_path, bad, loads)
    watcher._read_pointer = read_default  # as ModelOwner wires it
    pointer = tmp_path / "DEFAULT"

    async def main():
        (tmp_path / "v1").mkdir()
        (tmp_path / "v2").mkdir()
        pointer.write_text("v9\n")  # names a missing version, nothing served yet: the newest meanwhile
        assert await watcher.check_now()
        assert slot.version == "v2"
        pointer.write_text("v1\n")
        assert await watcher.check_now()
        assert slot.version == "v1"  # the pointer, not the newest
        (tmp_path / "v4").mkdir()
        assert not await watcher.check_now()
        assert slot.version == "v1"  # a newer version does not override the pointer
        caplog.clear()
        pointer.write_text("v9\n")
        assert not await watcher.check_now()
        assert not await watcher.check_now()
        assert slot.version == "v1"
        warned = [r for r in caplog.records if "DEFAULT names 'v9'" in r.getMessage()]
        assert len(warned) == 1 and "keeping v1" in warned[0].getMessage()  # once, not every poll
        (tmp_path / "v3").mkdir()
        pointer.write_text("v3\n")  # broken: refused and counted, v1 keeps serving
        assert not await watcher.check_now()
        assert not await watcher.check_now()
        assert slot.version == "v1" and loads.count("v3") == 1
        assert metrics.value("recstack_ranking_model_reloads_total", {"result": "failure"}) == 1
        pointer.unlink()  # no pointer: the newest valid version again
        assert await watcher.check_now()
        assert slot.version == "v4"

    asyncio.run(main())


def test_write_default_is_atomic_and_refuses_what_a_server_would_refuse(tmp_path):
    import pytest

    from models.artifacts import REQUIRED, ArtifactError, read_default, write_default, write_manifest

    models = tmp_path / "models"
    good = models / "v20240101-000000"
    good.mkdir(parents=True)
    for name in REQUIRED:
        (good / name).write_text("x")
    write_manifest(good)
    assert read_default(models) is None
    write_default(models, good.name)
    assert read_default(models) == good.name
    assert [p.name for p in models.iterdir() if p.name.startswith(".tmp")] == []
    with pytest.raises(ArtifactError, match="v20240102-000000.*not a complete model version"):
        write_default(models, "v20240102-000000")
    with pytest.raises(ArtifactError, match="not a complete model version"):
        write_default(models, "../elsewhere")
    (good / "vocab.json").write_text("tampered")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        write_default(models, good.name)
    assert read_default(models) == good.name  # a refused write leaves the pointer as it was
