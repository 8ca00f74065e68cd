"""TorchScript paths (models.compiled) score exactly like the eager model, for any batch shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.compiled import CompiledPaths
from models.inference import Ranker, RankInput
from models.model import ItemEmbeddingConfig, RankBatch, RankerConfig, TwoPathRanker
from models.router import PathRouter
from models.vocab import ItemVocab


@pytest.fixture(scope="module")
def model() -> TwoPathRanker:
    torch.manual_seed(3)
    vocab_rows = 2 + 60
    m = TwoPathRanker(RankerConfig(embedding=ItemEmbeddingConfig(num_rows=vocab_rows, dim=16))).eval()
    with torch.no_grad():  # non-trivial residual and repeat weights
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.prepare_inference()
    return m


def _batch(B: int, L: int, C: int, seed: int) -> RankBatch:
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(2, 62, (B, L), generator=g)
    cand = torch.randint(2, 62, (B, C), generator=g)
    if B > 1:
        hist[1, L // 2 :] = 0
        cand[-1, C // 2 :] = 0
    return RankBatch(hist, torch.rand(B, 5, generator=g), cand, torch.rand(B, C, 4, generator=g))


@pytest.mark.parametrize(("B", "L", "C"), [(1, 1, 30), (2, 50, 100), (5, 3, 17), (9, 12, 64)])
def test_every_path_matches_eager_at_shapes_unlike_the_trace(model, B, L, C) -> None:
    compiled = CompiledPaths(model)
    batch = _batch(B, L, C, seed=B * 100 + C)
    head = torch.tensor([min(12, C - 1)] * B)
    head[0] = min(10, C - 1)
    with torch.inference_mode():
        for path in ("light", "full"):
            expected = getattr(model, path)(batch)
            torch.testing.assert_close(compiled(path, batch), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            compiled("cascade", batch, head), model.cascade(batch, head), rtol=1e-4, atol=1e-5
        )
    # One graph per (path, head): the cascade keys by the batch's largest head.
    assert ("cascade", int(head.max())) in compiled.traced


def test_ranker_compiled_and_eager_rank_alike(model) -> None:
    vocab = ItemVocab([f"i{k}" for k in range(60)])
    eager = Ranker(model, vocab, {}, "v1", PathRouter())
    compiled = Ranker(model, vocab, {}, "v1", PathRouter(), compiled=True)
    assert compiled.compiled is not None and eager.compiled is None
    compiled.warmup()
    rng = np.random.default_rng(0)
    inputs = [
        RankInput(
            [f"i{k}" for k in rng.choice(60, n_hist, replace=False)],
            (3.0, 1.0, 0.0),
            30.0 if n_hist else None,
            [f"i{k}" for k in rng.choice(60, n_cand, replace=False)] + ["unknown-item"],
            rng.random((n_cand + 1, 4)).astype(np.float32),
        )
        for n_hist, n_cand in ((0, 20), (5, 40), (30, 59), (1, 8))
    ]
    for force in (None, "light", "full", "cascade"):
        for a, b in zip(
            eager.rank_batch(inputs, force_path=force),
            compiled.rank_batch(inputs, force_path=force),
            strict=True,
        ):
            assert a.path == b.path
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-5)


def test_a_model_with_the_dynamic_int8_mlp_is_not_traced(model) -> None:
    from models.quantize import TorchDynamicMLP

    dynamic = TwoPathRanker(model.config).eval()
    dynamic.load_state_dict(model.state_dict())
    dynamic.mlp = TorchDynamicMLP(dynamic.mlp)
    assert not CompiledPaths.supported(dynamic)
    ranker = Ranker(dynamic, ItemVocab([f"i{k}" for k in range(60)]), {}, "v", PathRouter(), compiled=True)
    assert ranker.compiled is None
