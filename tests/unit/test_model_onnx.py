"""The interaction MLP on ONNX Runtime (the served int8 dense runtime) agrees with torch."""

from __future__ import annotations

import pytest
import torch

from models.features import ITEM_DENSE_DIM, USER_DENSE_DIM
from models.model import FullPathConfig, InteractionMLP, ItemEmbeddingConfig, RankerConfig, TwoPathRanker
from models.onnx_mlp import OnnxInteractionMLP
from models.quantize import DENSE_RUNTIMES, build_int8_model, quantize_state_dict, with_dense_runtime

pytest.importorskip("onnxruntime")

D = 16


def inputs(B: int = 3, C: int = 7):
    g = torch.Generator().manual_seed(0)
    a, e = torch.randn(B, C, D, generator=g) * 0.5, torch.randn(B, C, D, generator=g) * 0.5
    return (
        a,
        e,
        torch.rand(B, C, ITEM_DENSE_DIM, generator=g),
        torch.rand(B, C, generator=g),
        torch.randn(B, D + USER_DENSE_DIM, generator=g),
    )


@pytest.mark.parametrize("int8", [False, True])
def test_onnx_mlp_matches_torch(int8):
    torch.manual_seed(0)
    cfg = RankerConfig(ItemEmbeddingConfig(num_rows=10, dim=D), full=FullPathConfig(mlp_hidden=(32, 16)))
    mlp = InteractionMLP(cfg).eval()
    onnx = OnnxInteractionMLP(mlp, int8=int8)
    a, e, dense, rep, user = inputs()
    with torch.inference_mode():
        ref = mlp(a, e, mlp.item_hidden(e), dense, rep, user)
        got = onnx(a, e, onnx.item_hidden(e), dense, rep, user)
    assert got.shape == ref.shape == (3, 7)
    tolerance = 0.05 * float(ref.abs().max()) + 0.02 if int8 else 1e-4
    assert float((got - ref).abs().max()) <= tolerance


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.ao deprecation notices
@pytest.mark.parametrize("runtime", DENSE_RUNTIMES)
def test_every_dense_runtime_scores_like_fp32(runtime):
    torch.manual_seed(1)
    cfg = RankerConfig(
        ItemEmbeddingConfig(num_rows=30, dim=D), full=FullPathConfig(attention_dim=8, mlp_hidden=(16,))
    )
    model = TwoPathRanker(cfg).eval()
    served = build_int8_model(cfg, quantize_state_dict(model.state_dict()), runtime).eval()
    from models.model import RankBatch

    g = torch.Generator().manual_seed(2)
    batch = RankBatch(
        torch.randint(0, 30, (4, 6), generator=g),
        torch.rand(4, USER_DENSE_DIM, generator=g),
        torch.randint(2, 30, (4, 9), generator=g),
        torch.rand(4, 9, ITEM_DENSE_DIM, generator=g),
    )
    with torch.inference_mode():
        ref = model.full(batch)
        served.prepare_inference()
        got = served.full(batch)
    assert torch.allclose(got, ref, atol=0.1)
    with pytest.raises(ValueError):
        with_dense_runtime(model, "tpu")
