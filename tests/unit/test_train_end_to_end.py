"""``recstack train`` / ``evaluate`` end to end on the real OTTO sample, in seconds."""

from __future__ import annotations

import json

import pytest
import torch

from models import artifacts
from models.artifacts import list_versions, load_version
from models.inference import RankInput
from models.retrain import TrainJob, run_evaluate, run_train
from models.train import TrainConfig
from recstack.cli import main
from recstack.sources import load_otto

UNTIL = "2022-08-01T12:00:00Z"  # OTTO sample: ~1/6 of its events fall before this


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    job = TrainJob(
        events=["otto"],
        out=out,
        until=UNTIL,
        train=TrainConfig(epochs=2, batch_size=16),
        embedding_dim=16,
        min_item_count=1,
        bench=False,
        progress=False,
    )
    folder = run_train(job)
    assert folder is not None
    return folder


def test_train_publishes_a_complete_evaluated_version(version):
    assert list_versions(version.parent) == [version]
    for name in ("report.md", "training_curve.png", "metrics.json", "config.json"):
        assert (version / name).is_file()
    manifest = (version / artifacts.MANIFEST).read_text()
    assert "report.md" in manifest and "training_curve.png" in manifest
    metrics = json.loads((version / "metrics.json").read_text())
    assert 0.0 <= metrics["hr@10"] <= 1.0 and 0.0 <= metrics["ndcg@10"] <= 1.0
    quality = metrics["quality"]
    for precision in ("fp32", "int8"):
        assert set(quality["model"][precision]) == {"light", "full", "routed"}
    assert set(quality["baselines"]) == {"popularity", "cooccurrence", "als"}
    assert metrics["sizes"]["ratio"] > 1.0
    assert any(t["target"].startswith("routed int8 NDCG@10") for t in metrics["targets"])
    config = json.loads((version / "config.json").read_text())
    assert config["trained_until"] == UNTIL
    assert "| baseline: popularity |" in (version / "report.md").read_text()


def test_trained_version_serves(version):
    ranker = load_version(version)
    ranker.warmup()
    known = ranker.vocab.item_ids
    out = ranker.rank_batch([RankInput(known[:3], (3, 1, 0), 10.0, known[:20], torch.ones(20, 4).numpy())])
    assert out[0].scores.shape == (20,)
    assert len(ranker.candidates(known[:2], 5)) == 5


def test_evaluate_a_saved_version(version):
    result = run_evaluate(version.parent, ["otto"], None, None)
    assert result["version"] == version.name and result["until"] == UNTIL
    assert result["quality"]["evaluated"]


def test_warm_start_from_previous_version(version, tmp_path):
    job = TrainJob(
        events=["otto"],
        out=tmp_path,
        until=UNTIL,
        init_from=version,
        train=TrainConfig(epochs=1, batch_size=16),
        embedding_dim=16,
        min_item_count=1,
        bench=False,
        progress=False,
    )
    folder = run_train(job)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["training"]["warm_start_item_rows"] == len(load_version(version).vocab.item_ids)


def test_cli_bad_values_name_the_flag(tmp_path, capsys):
    assert main(["train", "--events", "otto", "--until", "soon", "--out", str(tmp_path)]) == 2
    assert "--until" in capsys.readouterr().err
    assert main(["train", "--events", "nowhere.jsonl", "--out", str(tmp_path)]) == 2
    assert "--events" in capsys.readouterr().err
    assert (
        main(["train", "--events", "otto", "--init-from", str(tmp_path / "nope"), "--out", str(tmp_path)])
        == 2
    )
    assert "--init-from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--events", "otto", "--epochs", "0"])
    assert "--epochs" in capsys.readouterr().err
    assert list_versions(tmp_path) == []


def test_otto_has_all_event_types():
    assert set(load_otto()["event_type"]) == {"view", "add_to_cart", "purchase"}
