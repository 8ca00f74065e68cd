"""The inference API: routing, batching, the cascade and candidate generation."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from models.inference import Ranker, RankInput
from models.model import FullPathConfig, ItemEmbeddingConfig, RankerConfig, TwoPathRanker
from models.router import PathRouter, RouterConfig
from models.vocab import ItemVocab

ITEMS = [f"i{i}" for i in range(60)]


@pytest.fixture(scope="module")
def ranker() -> Ranker:
    torch.manual_seed(0)
    vocab = ItemVocab(ITEMS)
    cfg = RankerConfig(
        ItemEmbeddingConfig(num_rows=len(vocab), dim=8), full=FullPathConfig(attention_dim=4, mlp_hidden=(8,))
    )
    model = TwoPathRanker(cfg)
    with torch.no_grad():
        model.residual_bound.fill_(2.0)
    stats = np.zeros((len(vocab), 4), np.float32)
    stats[2:, 2] = np.arange(len(ITEMS))[::-1]  # i0 is the most purchased
    return Ranker(model, vocab, {}, "v-test", PathRouter(RouterConfig(cascade_head=5, min_head=2)), stats)


def request(n_hist: int = 5, n_cand: int = 30, seed: int = 0) -> RankInput:
    rng = np.random.default_rng(seed)
    hist = [ITEMS[i] for i in rng.choice(len(ITEMS), n_hist, replace=False)]
    cands = [ITEMS[i] for i in rng.choice(len(ITEMS), n_cand, replace=False)]
    return RankInput(
        hist,
        (float(n_hist), 1.0, 0.0),
        60.0 if n_hist else None,
        cands,
        rng.random((n_cand, 4)).astype(np.float32),
    )


def test_router_rules():
    router = PathRouter(
        RouterConfig(
            cascade_head=20,
            cascade_head_fraction=0.02,
            shrink_from_load=0.5,
            min_head=10,
            light_from_load=0.9,
        )
    )
    assert router.route(False, 100).path == "light"  # cold user
    assert router.route(True, 100).path == "cascade" and router.route(True, 100).head == 20
    assert router.route(True, 4000).head == 80  # long lists get a wider head
    assert router.route(True, 15).path == "full"  # the head would be everything
    assert router.route(True, 100, load=0.7).head == 15  # shrinking under load
    assert router.route(True, 100, load=0.95).path == "light"
    assert router.route(False, 100, force="full").path == "full"
    with pytest.raises(ValueError):
        router.route(True, 100, force="fast")
    heads = [router.head_for(100, x / 20) for x in range(21)]
    assert heads == sorted(heads, reverse=True)  # never widens as load grows


def test_rank_batch_routes_and_returns_scores_per_candidate(ranker):
    inputs = [request(), request(n_hist=0, seed=1), request(n_cand=3, seed=2)]
    out = ranker.rank_batch(inputs)
    assert [o.path for o in out] == ["cascade", "light", "full"]
    for inp, o in zip(inputs, out, strict=True):
        assert o.scores.dtype == np.float32 and o.scores.shape == (len(inp.candidates),)
        assert np.isfinite(o.scores).all()
    assert all(o.path == "light" for o in ranker.rank_batch(inputs, load=1.0))
    assert all(o.path == "full" for o in ranker.rank_batch(inputs, force_path="full"))
    assert ranker.rank_batch([]) == []


@pytest.mark.parametrize("path", ["light", "full", "cascade"])
def test_batched_scores_equal_one_at_a_time(ranker, path):
    inputs = [
        request(n_hist=h, n_cand=c, seed=s) for s, (h, c) in enumerate([(5, 30), (1, 7), (20, 12), (0, 9)])
    ]
    together = ranker.rank_batch(inputs, force_path=path)
    for inp, o in zip(inputs, together, strict=True):
        alone = ranker.rank_batch([inp], force_path=path)[0]
        assert np.allclose(o.scores, alone.scores, atol=1e-5)


def test_cascade_reorders_only_the_light_head(ranker):
    inp = request(n_cand=40)
    light = ranker.rank_batch([inp], force_path="light")[0].scores
    full = ranker.rank_batch([inp], force_path="full")[0].scores
    cascade = ranker.rank_batch([inp], force_path="cascade")[0].scores
    head = set(np.argsort(-light)[:5])
    assert set(np.argsort(-cascade)[:5]) == head  # the head stays on top
    head_order = sorted(head, key=lambda i: -full[i])
    assert list(np.argsort(-cascade)[:5]) == head_order  # ordered by the full path
    tail = [i for i in np.argsort(-light) if i not in head]
    assert [i for i in np.argsort(-cascade) if i not in head] == tail  # tail keeps the light order


def test_unknown_items_and_bad_stats(ranker):
    out = ranker.rank_batch(
        [RankInput(["zz"], (0, 0, 0), None, ["nope", "i1"], np.zeros((2, 4), np.float32))]
    )
    assert np.isfinite(out[0].scores).all()
    with pytest.raises(ValueError, match="item_stats has 1 rows for 2 candidates"):
        ranker.rank_batch([RankInput([], (0, 0, 0), None, ["a", "b"], np.zeros((1, 4), np.float32))])


def test_candidates(ranker):
    cold = ranker.candidates([], 5)
    assert len(cold) == 5 and len(set(cold)) == 5
    warm = ranker.candidates(["i3", "i4"], 10, exclude={"i3"})
    assert len(warm) == 10 and "i3" not in warm and set(warm) <= set(ITEMS)
    assert ranker.candidates(["i3"], 0) == []
    assert len(ranker.candidates([], 1000)) == len(ITEMS)


def test_warmup_and_concurrent_batches(ranker):
    ranker.warmup()
    inputs = [request(seed=s) for s in range(6)]
    expected = [o.scores for o in ranker.rank_batch(inputs, force_path="full")]
    errors: list[Exception] = []

    def work():
        try:
            for _ in range(5):
                got = ranker.rank_batch(inputs, force_path="full")
                assert all(np.allclose(g.scores, e, atol=1e-5) for g, e in zip(got, expected, strict=True))
        except Exception as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_light_requests_riding_in_a_cascade_pass_get_light_scores(ranker):
    warm, cold = request(seed=3), request(n_hist=0, seed=4)
    mixed = ranker.rank_batch([warm, cold])
    assert [o.path for o in mixed] == ["cascade", "light"]
    assert np.allclose(mixed[1].scores, ranker.rank_batch([cold], force_path="light")[0].scores, atol=1e-5)
    assert np.allclose(mixed[0].scores, ranker.rank_batch([warm])[0].scores, atol=1e-5)
