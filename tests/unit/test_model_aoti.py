"""The served model compiled ahead of time (models.aoti): one graph for every path, equal to eager,
recorded and checksummed in the version, refused where the CPU lacks what it was compiled for."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from models import aoti
from models.artifacts import load_version, publish_version, verify_manifest
from models.inference import RankInput
from models.model import ItemEmbeddingConfig, RankBatch, RankerConfig, TwoPathRanker
from models.vocab import ItemVocab

ITEMS = [f"sku-{k}" for k in range(120)]


def _model() -> TwoPathRanker:
    torch.manual_seed(3)
    model = TwoPathRanker(RankerConfig(ItemEmbeddingConfig(num_rows=len(ItemVocab(ITEMS)), dim=16)))
    with torch.no_grad():  # a trained-looking full path: a residual that matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_one_cascade_function_is_every_path():
    model = _model()
    model.prepare_inference()
    g = torch.Generator().manual_seed(0)
    B, L, C = 4, 6, 30
    batch = RankBatch(
        torch.randint(2, len(ITEMS), (B, L), generator=g),
        torch.rand(B, model.config.user_dense_dim, generator=g),
        torch.randint(2, len(ITEMS), (B, C), generator=g),
        torch.rand(B, C, model.config.item_dense_dim, generator=g),
    )
    with torch.inference_mode():
        light = model.cascade_top(batch, torch.zeros(B, dtype=torch.int64), 1)
        full = model.cascade_top(batch, torch.full((B,), C), C)
        assert torch.allclose(light, model.light(batch), atol=1e-5)
        assert torch.allclose(full, model.full(batch), atol=1e-5)
        head = torch.tensor([5, 0, 10, C])
        mixed = model.cascade_top(batch, head, C)
        assert torch.allclose(mixed[1], light[1], atol=1e-5) and torch.allclose(mixed[3], full[3], atol=1e-5)
        assert torch.allclose(mixed[0], model.cascade(batch, torch.full((B,), 5))[0], atol=1e-5)


def test_a_published_version_serves_its_compiled_graph_and_falls_back_where_it_cannot(
    tmp_path, monkeypatch, caplog
):
    model = _model()
    folder = publish_version(
        tmp_path,
        model,
        ItemVocab(ITEMS),
        np.ones((len(ItemVocab(ITEMS)), 4), np.float32),
        {},
        served_form="aoti",
    )
    config = json.loads((folder / "config.json").read_text())
    served = config["served"]
    assert served["form"] == "aoti" and served["torch"] == torch.__version__
    assert served["max_abs_diff_vs_eager"] <= 1e-4
    assert set(served["cpu_flags"]) <= aoti.cpu_flags()
    assert aoti.PACKAGE in verify_manifest(folder)  # checksummed like the weights

    compiled = load_version(folder, dense_runtime="aoti")
    traced = load_version(folder, dense_runtime="torchscript")
    assert compiled.form == "aoti" and traced.form == "torchscript"
    rng = np.random.default_rng(1)
    inputs = [
        RankInput(
            list(rng.choice(ITEMS, 12, replace=False)),
            (4.0, 1.0, 1.0),
            30.0,
            list(rng.choice(ITEMS, n, replace=False)),
            rng.random((n, 4), dtype=np.float32) * 5,
        )
        for n in (100, 37, 1)
    ]
    inputs.append(RankInput([], (0.0, 0.0, 0.0), None, ITEMS[:40], np.ones((40, 4), np.float32)))
    for force in (None, "light", "cascade", "full"):
        got = compiled.rank_batch(inputs, force_path=force)
        want = traced.rank_batch(inputs, force_path=force)
        assert [o.path for o in got] == [o.path for o in want]
        for g, w in zip(got, want, strict=True):
            assert g.scores.shape == w.scores.shape
            assert np.allclose(g.scores, w.scores, atol=1e-5), force

    # A CPU without a feature the code was compiled for: TorchScript, with a warning saying why.
    monkeypatch.setattr(aoti, "cpu_flags", lambda: set())
    with caplog.at_level(logging.WARNING, logger="models.artifacts"):
        fallback = load_version(folder, dense_runtime="aoti")
    assert fallback.form == "torchscript"
    assert "compiled for CPU features this CPU lacks" in caplog.text


def test_a_version_published_without_a_package_says_so_and_serves_torchscript(tmp_path):
    folder = publish_version(
        tmp_path, _model(), ItemVocab(ITEMS), np.ones((len(ItemVocab(ITEMS)), 4), np.float32), {},
        served_form="torchscript",
    )  # fmt: skip
    assert json.loads((folder / "config.json").read_text())["served"]["form"] == "torchscript"
    assert not (folder / aoti.PACKAGE).exists()
    assert load_version(folder, dense_runtime="aoti").form == "torchscript"


def test_without_a_compiler_the_version_is_published_for_torchscript_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(aoti, "compiler_available", lambda: False)
    folder = publish_version(
        tmp_path, _model(), ItemVocab(ITEMS), np.ones((len(ItemVocab(ITEMS)), 4), np.float32), {},
        served_form="aoti",
    )  # fmt: skip
    served = json.loads((folder / "config.json").read_text())["served"]
    assert served["form"] == "torchscript" and "no C++ compiler" in served["reason"]
    assert load_version(folder, dense_runtime="aoti").form == "torchscript"
