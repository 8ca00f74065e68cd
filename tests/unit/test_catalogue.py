"""Service lines are not products: the one definition, the item catalogue's *recommendable* flag
(set at training, stored in the artifact), Recommend's candidates, Rank, and the load tests' items.

The Online Retail mapping's half (service lines dropped from the events) is in test_sources.py;
Recommend through a real server is in tests/integration/test_ranking_server.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models import artifacts
from models.artifacts import ArtifactError, load_version, publish_version
from models.inference import Ranker, RankInput
from models.model import FullPathConfig, ItemEmbeddingConfig, RankerConfig, TwoPathRanker
from models.router import PathRouter
from models.vocab import FIRST_ITEM_ROW, ItemVocab

GOODS = [f"i{k}" for k in range(40)]
SERVICE = ["POST", "DOT", "M", "gift_0001_20"]
SERVICE_CODES = ["POST", "DOT", "M", "m", "C2", "D", "S", "B", "BANK CHARGES", "AMAZONFEE", "CRUK"]


def tiny_model(vocab: ItemVocab, seed: int = 0) -> TwoPathRanker:
    torch.manual_seed(seed)
    cfg = RankerConfig(
        ItemEmbeddingConfig(num_rows=len(vocab), dim=8), full=FullPathConfig(attention_dim=4, mlp_hidden=(8,))
    )
    return TwoPathRanker(cfg).eval()


def stats_for(vocab: ItemVocab) -> np.ndarray:
    stats = np.ones((len(vocab), 4), np.float32)
    stats[vocab.row("POST")] = (5e4, 5e3, 2e3, 300.0)  # by far the most bought line, as in Online Retail
    return stats


def test_the_definition_names_service_lines_and_not_goods():
    from recstack.catalogue import is_recommendable

    for code in [*SERVICE_CODES, "gift_0001_10", "gift_0001_50"]:
        assert not is_recommendable(code), code
    # Codes that do not start with a digit can still be goods; ids of other sources are goods.
    for code in ["85123A", "PADS", "DCGS0004", "DCGSSBOY", "i7", "otto-123", "POSTER", "gift_0002_10"]:
        assert is_recommendable(code), code


def test_the_vocabulary_flags_items_by_the_definition_and_items_first_seen_live_too():
    vocab = ItemVocab(GOODS + SERVICE)
    assert vocab.is_recommendable("i3") and not vocab.is_recommendable("POST")
    assert vocab.recommendable.tolist() == [True] * len(GOODS) + [False] * len(SERVICE)
    # Not in the vocabulary: recommendable unless the definition says otherwise.
    assert vocab.is_recommendable("brand-new-item")
    assert not vocab.is_recommendable("gift_0001_30") and not vocab.is_recommendable("CRUK")
    with pytest.raises(ValueError, match="recommendable"):
        ItemVocab(GOODS, recommendable=[True])


def test_training_sets_the_flag_from_the_definition():
    from models.data import build
    from recstack.sources import synthetic

    events = synthetic(3_000, n_users=50, n_items=30, n_categories=5, seed=4)
    events.loc[events["item_id"] == "i0", "item_id"] = "POST"
    built = build(events, until_ms=int(events["ts"].iloc[2_500]), min_item_count=1)
    assert "POST" in built.vocab and not built.vocab.is_recommendable("POST")
    assert sum(built.vocab.recommendable) == len(built.vocab.item_ids) - 1


def test_an_artifact_records_the_flag(tmp_path):
    # "house-fee" is flagged at training although the definition would allow it: the artifact,
    # not a recomputation at load, is what the loaded catalogue says.
    ids = GOODS + SERVICE + ["house-fee"]
    vocab = ItemVocab(ids, recommendable=[not (i in SERVICE or i == "house-fee") for i in ids])
    folder = publish_version(tmp_path, tiny_model(vocab), vocab, stats_for(vocab), {"note": "test"})
    with np.load(folder / artifacts.CATALOGUE, allow_pickle=False) as data:
        stored = data["recommendable"]
    assert stored.dtype == np.bool_ and stored.shape == (len(vocab),)  # one per row, as item_stats
    assert not stored[:FIRST_ITEM_ROW].any()  # padding and unknown rows are nothing to recommend
    assert stored[FIRST_ITEM_ROW:].tolist() == [True] * len(GOODS) + [False] * (len(SERVICE) + 1)

    loaded = load_version(folder).vocab
    assert loaded.recommendable.tolist() == stored[FIRST_ITEM_ROW:].tolist()
    assert not loaded.is_recommendable("house-fee") and loaded.is_recommendable("i0")


def test_a_version_without_the_flag_falls_back_to_the_definition_and_a_bad_flag_is_refused(tmp_path):
    ids = GOODS + SERVICE + ["house-fee"]
    vocab = ItemVocab(ids, recommendable=[i in GOODS for i in ids])
    folder = publish_version(tmp_path, tiny_model(vocab), vocab, stats_for(vocab), {"note": "test"})
    catalogue = folder / artifacts.CATALOGUE
    stats = np.load(catalogue)["item_stats"]

    np.savez(catalogue, item_stats=stats)  # as versions published before the flag existed
    artifacts.write_manifest(folder)
    older = load_version(folder).vocab
    assert older.is_recommendable("house-fee") and not older.is_recommendable("POST")

    np.savez(catalogue, item_stats=stats, recommendable=np.ones(3, np.bool_))
    artifacts.write_manifest(folder)
    with pytest.raises(ArtifactError, match="recommendable"):
        load_version(folder)


@pytest.fixture(scope="module")
def ranker() -> Ranker:
    vocab = ItemVocab(GOODS + SERVICE)
    return Ranker(tiny_model(vocab), vocab, {}, "v-test", PathRouter(), stats_for(vocab))


def test_recommend_candidates_never_hold_a_service_line(ranker):
    history = ["POST"] * 30 + SERVICE  # a customer whose every order paid postage
    everything = ranker.candidates(history, k=len(ranker.vocab.item_ids))
    assert sorted(everything) == sorted(GOODS)  # every good, and nothing else
    for k in (1, 5, 20):
        assert not set(ranker.candidates(history, k)) & set(SERVICE)
    assert not set(ranker.candidates([], 10)) & set(SERVICE)  # cold user: popular goods only
    assert len(ranker.candidates(history, 10, exclude={"i1", "i2"})) == 10


def test_rank_still_scores_a_service_line_the_caller_sends(ranker):
    candidates = ["POST", "i1", "gift_0001_20", "never-seen"]
    stats = np.ones((len(candidates), 4), np.float32)
    for path in ("light", "full", "cascade"):
        (out,) = ranker.rank_batch(
            [RankInput(["POST", "i3"], (2.0, 0.0, 9.0), 60.0, candidates, stats)], force_path=path
        )
        assert out.scores.shape == (4,) and np.isfinite(out.scores).all()
        assert out.scores[0] != out.scores[3]  # POST is scored as itself, not as an unknown item


def test_the_load_test_workload_uses_the_same_definition():
    from loadtests import workload

    items = ["85123A", "POST", "PADS", "DCGS0004", "gift_0001_10", "M", "BANK CHARGES", "22423"]
    frame = pd.DataFrame({"user_id": ["17850", "17850", "13047", "13047"] * 2, "item_id": items})
    got = workload.from_events(frame)
    assert got.items == sorted(["85123A", "PADS", "DCGS0004", "22423"])
    assert got.users == ["13047", "17850"]
