"""The ranker's sub-modules: shapes, determinism, masking, and the two paths' relation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.features import ITEM_DENSE_DIM, USER_DENSE_DIM, item_dense, user_dense
from models.model import (
    FullPathConfig,
    InteractionMLP,
    ItemEmbedding,
    ItemEmbeddingConfig,
    ItemFeatureBias,
    RankBatch,
    RankerConfig,
    RecencyPooling,
    RepeatSignal,
    TargetAttention,
    TwoPathRanker,
    UserTower,
    path_macs,
)
from models.quantize import dequantize_rows, fake_int8, quantize_rows, quantize_state_dict

V, D, L = 40, 8, 6


def config(**kw) -> RankerConfig:
    cfg = RankerConfig(
        ItemEmbeddingConfig(num_rows=V, dim=D), full=FullPathConfig(attention_dim=4, mlp_hidden=(16, 8))
    )
    cfg.light.history_len = L
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def model(seed: int = 0) -> TwoPathRanker:
    torch.manual_seed(seed)
    return TwoPathRanker(config()).eval()


def batch(B: int = 3, C: int = 5, seed: int = 1, cold_first: bool = True) -> RankBatch:
    g = torch.Generator().manual_seed(seed)
    hist = torch.stack([torch.randperm(V - 2, generator=g)[:L] + 2 for _ in range(B)])
    hist[:, L - 2 :] = 0  # padded tail
    if cold_first:
        hist[0] = 0
    return RankBatch(
        hist=hist,
        user_dense=torch.rand(B, USER_DENSE_DIM, generator=g),
        cand=torch.randint(2, V, (B, C), generator=g),
        item_dense=torch.rand(B, C, ITEM_DENSE_DIM, generator=g),
    )


def test_features_transform_is_shared_and_safe():
    u = user_dense(np.array([[0, 0, 0], [10, 2, -1]]), np.array([np.nan, 7200.0]))
    assert u.shape == (2, USER_DENSE_DIM) and u.dtype == np.float32
    assert u[0].tolist() == [0, 0, 0, 0, 1]  # no last event: flag set, hours zero
    assert u[1, 2] == 0.0 and u[1, 3] == pytest.approx(np.log1p(2.0))
    i = item_dense(np.zeros((3, 4)))
    assert i.shape == (3, ITEM_DENSE_DIM) and not i.any()


def test_item_embedding_shapes_and_padding_row():
    emb = ItemEmbedding(ItemEmbeddingConfig(num_rows=V, dim=D))
    e, b = emb(torch.tensor([[0, 1, 5]]))
    assert e.shape == (1, 3, D) and b.shape == (1, 3)
    assert torch.all(e[0, 0] == 0)


def test_int8_rows_round_trip_within_half_a_step():
    w = torch.randn(50, 16)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (50,)
    err = (dequantize_rows(q, scale) - w).abs()
    assert torch.all(err <= scale.unsqueeze(1) / 2 + 1e-7)


def test_int8_state_dict_is_about_four_times_smaller():
    m = TwoPathRanker(RankerConfig(ItemEmbeddingConfig(num_rows=5000, dim=64)))
    fp32 = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    int8 = sum(t.numel() * t.element_size() for t in quantize_state_dict(m.state_dict()).values())
    assert fp32 / int8 > 3.7


def test_recency_pooling_ignores_padding():
    pool = RecencyPooling(L)
    h = torch.randn(2, L, D)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = pool(h, mask)
    assert out.shape == (2, D)
    h2 = h.clone()
    h2[0, 2:] = 99.0
    assert torch.allclose(pool(h2, mask), out)
    assert torch.all(out[1] == 0)  # no history pools to zeros


def test_repeat_signal_layouts_agree():
    rep = RepeatSignal(L)
    with torch.no_grad():
        rep.slot_logit.copy_(torch.randn(L))
    b = batch()
    shared = torch.arange(2, V)
    with torch.no_grad():
        dense = rep(b.hist, shared)  # B x (V - 2)
        per_user = rep(b.hist, shared.expand(b.hist.shape[0], -1))
    assert torch.allclose(dense, per_user)
    assert torch.all(dense[0] == 0)  # cold user
    # an item in slot s of user 1 gets that slot's weight
    item = int(b.hist[1, 0])
    assert float(dense[1, item - 2]) == pytest.approx(
        float(torch.nn.functional.softplus(rep.slot_logit[0].detach()))
    )


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(2, V - 1), min_size=0, max_size=L, unique=True), st.integers(2, V - 1))
def test_repeat_signal_is_positive_exactly_for_history_items(history, candidate):
    rep = RepeatSignal(L)
    hist = torch.zeros(1, L, dtype=torch.long)
    hist[0, : len(history)] = torch.tensor(history, dtype=torch.long)
    with torch.no_grad():
        out = rep(hist, torch.tensor([[candidate]]))
    assert (float(out) > 0) == (candidate in history)


def test_user_tower_and_item_bias_shapes():
    cfg = config()
    tower = UserTower(cfg)
    assert tower(
        torch.randn(4, L, D), torch.ones(4, L, dtype=torch.bool), torch.randn(4, USER_DENSE_DIM)
    ).shape == (4, D)
    bias = ItemFeatureBias(cfg)
    assert bias(torch.randn(4, 7, ITEM_DENSE_DIM)).shape == (4, 7)
    assert bias(torch.randn(7, ITEM_DENSE_DIM)).shape == (7,)


def test_target_attention_shapes_and_cold_users_are_finite():
    att = TargetAttention(config())
    with torch.no_grad():
        out = att(
            att.queries(torch.randn(2, 5, D)), torch.randn(2, L, D), torch.zeros(2, L, dtype=torch.bool)
        )
    assert out.shape == (2, 5, D)
    assert torch.isfinite(out).all()


def test_interaction_mlp_shapes():
    cfg = config()
    mlp = InteractionMLP(cfg).eval()
    a, e = torch.randn(3, 5, D), torch.randn(3, 5, D)
    with torch.no_grad():
        out = mlp(
            a,
            e,
            mlp.item_hidden(e),
            torch.randn(3, 5, ITEM_DENSE_DIM),
            torch.rand(3, 5),
            torch.randn(3, D + USER_DENSE_DIM),
        )
        # the block-wise first layer equals the concatenated one
        pair = torch.cat([a, a * e, e, torch.zeros(3, 5, ITEM_DENSE_DIM), torch.zeros(3, 5, 1)], dim=2)
        h = mlp.pair_in(pair) + mlp.user_in(torch.zeros(3, D + USER_DENSE_DIM)).unsqueeze(1)
        ref = mlp.rest(h).squeeze(-1)
        got = mlp(
            a,
            e,
            mlp.item_hidden(e),
            torch.zeros(3, 5, ITEM_DENSE_DIM),
            torch.zeros(3, 5),
            torch.zeros(3, D + USER_DENSE_DIM),
        )
    assert out.shape == (3, 5)
    assert torch.allclose(got, ref, atol=1e-5)


def test_paths_shapes_determinism_and_residual_relation():
    m = model()
    b = batch()
    with torch.inference_mode():
        light, full = m.light(b), m.full(b)
        assert light.shape == full.shape == b.cand.shape
        assert torch.equal(light, m.light(b)) and torch.equal(full, m.full(b))
        assert torch.equal(model().full(b), full)  # same seed, same weights, same scores
        bound = float(torch.nn.functional.softplus(m.residual_bound))
        assert torch.all((full - light).abs() < bound)
        assert torch.allclose(m.full(b, light_scores=light), full)


def test_shared_candidates_match_per_user_candidates():
    m = model()
    b = batch(C=V - 2)
    shared = torch.arange(2, V)
    dense = torch.rand(V - 2, ITEM_DENSE_DIM)
    with torch.inference_mode():
        s1 = m.full(RankBatch(b.hist, b.user_dense, shared, dense))
        s2 = m.full(RankBatch(b.hist, b.user_dense, shared.expand(3, -1), dense.expand(3, -1, -1)))
    assert torch.allclose(s1, s2, atol=1e-5)


def test_scores_do_not_depend_on_padding():
    m = model()
    b = batch(B=2, C=4)
    longer = RankBatch(
        torch.cat([b.hist, torch.zeros(2, 0, dtype=torch.long)], 1),
        b.user_dense,
        torch.cat([b.cand, torch.zeros(2, 3, dtype=torch.long)], 1),
        torch.cat([b.item_dense, torch.zeros(2, 3, ITEM_DENSE_DIM)], 1),
    )
    shorter_hist = RankBatch(b.hist[:, : L - 2], b.user_dense, b.cand, b.item_dense)  # drop padded slots
    with torch.inference_mode():
        ref = m.full(b)
        assert torch.allclose(m.full(longer)[:, :4], ref, atol=1e-6)
        assert torch.allclose(m.full(shorter_hist), ref, atol=1e-6)


@pytest.mark.parametrize("int8", [False, True])
def test_inference_tables_give_the_same_scores(int8):
    m = fake_int8(model()) if int8 else model()
    b = batch()
    shared = RankBatch(b.hist, b.user_dense, torch.arange(2, V), torch.rand(V - 2, ITEM_DENSE_DIM))
    with torch.inference_mode():
        before = [m.light(b), m.full(b), m.full(shared)]
        assert m.prepare_inference()
        after = [m.light(b), m.full(b), m.full(shared)]
    for x, y in zip(before, after, strict=True):
        assert torch.allclose(x, y, atol=1e-5)
    m.train()
    assert m._tables is None
    assert not m.prepare_inference(max_bytes=10)


def test_int8_model_is_close_to_fp32():
    m = model()
    q = fake_int8(m)
    b = batch()
    with torch.inference_mode():
        assert torch.allclose(q.full(b), m.full(b), atol=0.05)


def test_path_costs_order():
    macs = path_macs(config(), L)
    assert macs["full_per_candidate"] > 10 * macs["light_per_candidate"]
