"""The popularity baseline as a model version: publication, checks and the ranker's answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models import artifacts
from models.inference import RankInput
from models.popularity import PopularityRanker, publish_popularity
from recstack.cli import main
from recstack.events import COLUMNS


def _events(counts: dict[str, tuple[int, int, int]], start_ms: int = 1_700_000_000_000) -> pd.DataFrame:
    """Events giving each item ``(views, add_to_carts, purchases)``, one ms apart."""
    rows = []
    for item, per_kind in counts.items():
        for kind, n in zip(("view", "add_to_cart", "purchase"), per_kind, strict=True):
            rows += [(item, kind)] * n
    return pd.DataFrame(
        {
            "event_id": [f"e{k}" for k in range(len(rows))],
            "user_id": [f"u{k % 7}" for k in range(len(rows))],
            "item_id": [r[0] for r in rows],
            "event_type": [r[1] for r in rows],
            "ts": [start_ms + k for k in range(len(rows))],
        }
    ).reindex(columns=list(COLUMNS))


# intent-weighted (1, 3, 5): a 15, b 10, c 9, POST 50 (a service line), d 1
COUNTS = {"a": (0, 0, 3), "b": (10, 0, 0), "c": (1, 1, 1), "POST": (50, 0, 0), "d": (1, 0, 0)}


def _input(candidates: list[str]) -> RankInput:
    return RankInput((), (0.0, 0.0, 0.0), None, candidates, np.zeros((len(candidates), 4), np.float32))


def test_published_version_loads_through_load_version_and_ranks_by_weighted_popularity(tmp_path: Path):
    folder = publish_popularity(tmp_path, _events(COUNTS), version="v20260101-000000")
    assert artifacts.list_versions(tmp_path) == [folder]
    config = json.loads((folder / artifacts.CONFIG).read_text())
    assert config["kind"] == "popularity" and config["version"] == folder.name
    assert set(artifacts.verify_manifest(folder, required=())) == {
        "config.json",
        "vocab.json",
        "catalogue.npz",
    }

    ranker = artifacts.load_version(folder)  # the server's loader
    assert isinstance(ranker, PopularityRanker) and ranker.version == folder.name
    ranker.warmup()
    (out,) = ranker.rank_batch([_input(["d", "unknown", "b", "a", "c"])], load=0.9, force_path="full")
    assert out.scores.tolist() == [1.0, 0.0, 10.0, 15.0, 9.0]
    # The same for everyone: a user's history changes nothing.
    other = RankInput(("d", "c"), (9.0, 3.0, 1.0), 5.0, ["d", "a"], np.ones((2, 4), np.float32))
    assert ranker.rank_batch([other])[0].scores.tolist() == [1.0, 15.0]
    # Recommend: the most popular recommendable items (POST is a service line), minus purchases.
    assert ranker.candidates([], 3) == ["a", "b", "c"]
    assert ranker.candidates(["d"], 3, exclude={"a"}) == ["b", "c", "d"]
    assert ranker.candidates([], 0) == []


def test_until_counts_only_earlier_events(tmp_path: Path):
    events = _events({"a": (5, 0, 0)})
    late = _events({"b": (9, 0, 0)}, start_ms=1_800_000_000_000)
    late["event_id"] = "late-" + late["event_id"]
    folder = publish_popularity(tmp_path, pd.concat([events, late]), until_ms=1_750_000_000_000)
    ranker = artifacts.load_version(folder)
    assert ranker.rank_batch([_input(["a", "b"])])[0].scores.tolist() == [5.0, 0.0]


def test_a_tampered_or_unknown_version_is_refused(tmp_path: Path):
    folder = publish_popularity(tmp_path, _events(COUNTS), version="v20260101-000000")
    with np.load(folder / artifacts.CATALOGUE) as data:
        arrays = dict(data)
    arrays["popularity"][2] = 1e6  # promote an item without republishing
    np.savez(folder / artifacts.CATALOGUE, **arrays)
    with pytest.raises(artifacts.ArtifactError, match="checksum mismatch for catalogue.npz"):
        artifacts.load_version(folder)

    other = publish_popularity(tmp_path, _events(COUNTS), version="v20260102-000000")
    config = json.loads((other / artifacts.CONFIG).read_text())
    (other / artifacts.CONFIG).write_text(json.dumps({**config, "kind": "mystery"}))
    with pytest.raises(artifacts.ArtifactError, match="unknown kind 'mystery'"):
        artifacts.load_version(other)


def test_publish_baseline_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    log = tmp_path / "events.jsonl"
    frame = _events(COUNTS)
    log.write_text("".join(json.dumps(row) + "\n" for row in frame.dropna(axis=1).to_dict("records")))
    models = tmp_path / "models"
    args = ["publish-baseline", "popularity", "--models", str(models), "--from", str(log)]
    assert main([*args, "--version", "v20260103-000000"]) == 0
    assert "published" in capsys.readouterr().out
    ranker = artifacts.load_version(models / "v20260103-000000")
    assert ranker.candidates([], 2) == ["a", "b"]
    assert main([*args, "--version", "latest"]) == 2
    assert "--version: 'latest' is not a version name" in capsys.readouterr().err
    assert main(["publish-baseline", "popularity", "--models", str(models), "--from", "nowhere"]) == 2
    assert "--from: nowhere is neither an event log" in capsys.readouterr().err
