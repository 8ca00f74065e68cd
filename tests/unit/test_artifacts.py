"""Model versions on disk: atomic publication, listing, verification, safe loading, identical scores."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from models import artifacts
from models.artifacts import ArtifactError, list_versions, load_version, publish_version
from models.inference import RankInput
from models.model import FullPathConfig, ItemEmbeddingConfig, RankerConfig, TwoPathRanker
from models.vocab import ItemVocab

ITEMS = [f"item-{i}" for i in range(30)]


def tiny_model(seed: int = 0) -> tuple[TwoPathRanker, ItemVocab]:
    torch.manual_seed(seed)
    vocab = ItemVocab(ITEMS)
    cfg = RankerConfig(
        ItemEmbeddingConfig(num_rows=len(vocab), dim=8), full=FullPathConfig(attention_dim=4, mlp_hidden=(8,))
    )
    return TwoPathRanker(cfg).eval(), vocab


def publish(tmp_path, seed: int = 0, version: str | None = None):
    m, vocab = tiny_model(seed)
    stats = np.random.default_rng(seed).random((len(vocab), 4)).astype(np.float32)
    return publish_version(
        tmp_path, m, vocab, stats, {"note": "test"}, metrics={"hr@10": 0.5, "ndcg@10": 0.2}, version=version
    )


def requests() -> list[RankInput]:
    return [
        RankInput(
            ["item-1", "item-2", "never-seen"],
            (5.0, 1.0, 0.0),
            30.0,
            ITEMS[:25] + ["new-item"],
            np.ones((26, 4), np.float32),
        ),
        RankInput([], (0.0, 0.0, 0.0), None, ["item-3", "item-4"], np.zeros((2, 4), np.float32)),
    ]


def test_publish_is_complete_and_leaves_no_temporary(tmp_path):
    folder = publish(tmp_path, version="v20260101-000000")
    assert folder.name == "v20260101-000000"
    names = {p.name for p in folder.iterdir()}
    assert set(artifacts.REQUIRED) | {artifacts.MANIFEST, artifacts.METRICS} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    listed = {line.split("  ")[1] for line in (folder / artifacts.MANIFEST).read_text().splitlines()}
    assert listed == names - {artifacts.MANIFEST}
    config = json.loads((folder / artifacts.CONFIG).read_text())
    assert config["model"]["embedding"]["num_rows"] == len(ITEMS) + 2 and config["version"] == folder.name


def test_list_versions_sorted_and_ignores_temporary_and_junk(tmp_path):
    publish(tmp_path, version="v20260102-000000")
    publish(tmp_path, version="v20260101-000000")
    again = publish(tmp_path, version="v20260101-000000")  # same second: gets a suffix, sorts after
    (tmp_path / ".tmp-v20991231-000000").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "v20990101-000000").mkdir()  # no manifest: not a version (yet)
    names = [p.name for p in list_versions(tmp_path)]
    assert names == ["v20260101-000000", again.name, "v20260102-000000"]
    assert again.name == "v20260101-000000-1"
    assert list_versions(tmp_path / "missing") == []


@pytest.mark.parametrize("quantized", [False, True])
def test_save_load_gives_identical_scores(tmp_path, quantized):
    folder = publish(tmp_path)
    a, b = load_version(folder, quantized=quantized), load_version(folder, quantized=quantized)
    assert a.version == folder.name and a.config["version"] == folder.name
    for path in (None, "light", "full", "cascade"):
        out_a, out_b = a.rank_batch(requests(), force_path=path), b.rank_batch(requests(), force_path=path)
        for x, y in zip(out_a, out_b, strict=True):
            assert x.path == y.path
            assert np.array_equal(x.scores, y.scores)


def test_loaded_fp32_matches_the_trained_model(tmp_path):
    m, vocab = tiny_model()
    folder = publish(tmp_path)
    ranker = load_version(folder, quantized=False)
    for name, tensor in m.state_dict().items():
        assert torch.equal(ranker.model.state_dict()[name], tensor)


def test_int8_scores_close_to_fp32(tmp_path):
    folder = publish(tmp_path)
    fp32, int8 = load_version(folder, quantized=False), load_version(folder, quantized=True)
    for x, y in zip(
        fp32.rank_batch(requests(), force_path="full"),
        int8.rank_batch(requests(), force_path="full"),
        strict=True,
    ):
        assert np.allclose(x.scores, y.scores, atol=0.05)


def test_corrupted_weights_refused_with_clear_error(tmp_path):
    folder = publish(tmp_path)
    weights = folder / artifacts.WEIGHTS_INT8
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for weights\.int8\.pt"):
        load_version(folder)


def test_missing_file_and_missing_manifest_refused(tmp_path):
    folder = publish(tmp_path)
    (folder / artifacts.VOCAB).unlink()
    with pytest.raises(ArtifactError, match="vocab.json is listed in MANIFEST.sha256 but missing"):
        load_version(folder)
    other = publish(tmp_path, seed=1)
    (other / artifacts.MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="MANIFEST.sha256 is missing"):
        load_version(other)
    with pytest.raises(ArtifactError, match="not a model version folder"):
        load_version(tmp_path / "nope")


class Payload:
    """Anything that is not a tensor: must never be unpickled by the loader."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_weights_with_pickled_objects_refused_even_with_matching_checksums(tmp_path):
    folder = publish(tmp_path)
    torch.save({"items.weight": Payload()}, folder / artifacts.WEIGHTS_FP32)
    artifacts.write_manifest(folder)  # checksums now match the hostile file
    with pytest.raises(ArtifactError, match="cannot load weights"):
        load_version(folder, quantized=False)


def test_weights_that_do_not_fit_the_config_refused(tmp_path):
    folder = publish(tmp_path)
    state = torch.load(folder / artifacts.WEIGHTS_FP32, weights_only=True)
    state["items.weight"] = torch.zeros(3, 8)
    torch.save(state, folder / artifacts.WEIGHTS_FP32)
    artifacts.write_manifest(folder)
    with pytest.raises(ArtifactError, match="do not fit the model config"):
        load_version(folder, quantized=False)


def test_failed_publication_leaves_nothing(tmp_path):
    m, vocab = tiny_model()

    def explode(folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        publish_version(tmp_path, m, vocab, np.zeros((len(vocab), 4), np.float32), {}, extra_files=explode)
    assert list(tmp_path.iterdir()) == []


def test_a_retired_dense_runtime_loads_with_fp32_dense_layers(tmp_path, caplog):
    """Versions of earlier releases may name the retired ONNX Runtime int8 runtime: they still load,
    their dense layers in fp32 from the same int8 weights, with a warning that says so."""
    folder = publish(tmp_path)
    with caplog.at_level("WARNING", logger=artifacts.__name__):
        retired = load_version(folder, dense_runtime="onnxruntime-int8")
    assert "onnxruntime-int8 was retired; using fp32 dense layers" in caplog.text
    fp32_dense = load_version(folder, dense_runtime="fp32")
    for a, b in zip(retired.rank_batch(requests()), fp32_dense.rank_batch(requests()), strict=True):
        np.testing.assert_array_equal(a.scores, b.scores)
