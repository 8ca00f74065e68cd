"""Baselines on the same split and the same evaluation as the model.

* popularity: training interactions per item, the same list for everyone;
* co-occurrence (item-to-item): cosine similarity of items over the users who interacted with
  them, summed over the user's recent items (their own items included, so repeats count);
* ALS (``implicit``): matrix factorisation of the user x item interaction counts; users unknown
  to training get the popularity list.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.sparse as sp

from models.data import EvalSet, TrainingData
from models.metrics import ScoreFn
from models.vocab import FIRST_ITEM_ROW, OOV, PAD

log = logging.getLogger(__name__)


def popularity(data: TrainingData) -> np.ndarray:
    """``V`` interaction counts per item row (PAD and OOV zero)."""
    counts = np.bincount(data.train_item, minlength=len(data.vocab)).astype(np.float32)
    counts[[PAD, OOV]] = 0.0
    return counts


def popularity_scorer(data: TrainingData) -> ScoreFn:
    pop = popularity(data)[FIRST_ITEM_ROW:]

    def score(lo: int, hi: int) -> np.ndarray:
        return np.tile(pop, (hi - lo, 1))

    return score


def _user_item_matrix(data: TrainingData) -> sp.csr_matrix:
    keep = data.train_item >= FIRST_ITEM_ROW
    values = np.ones(int(keep.sum()), dtype=np.float32)
    return sp.csr_matrix(
        (values, (data.train_user[keep], data.train_item[keep])), shape=(len(data.user_ids), len(data.vocab))
    )


def cooccurrence_scorer(data: TrainingData, eval_set: EvalSet) -> ScoreFn:
    """Item-item cosine over users; the user's recent items (up to 50, as served) vote."""
    binary = _user_item_matrix(data)
    binary.data[:] = 1.0
    co = (binary.T @ binary).toarray().astype(np.float32)  # V x V
    norms = np.sqrt(np.maximum(np.diag(co), 1e-9))
    sim = co / norms[:, None] / norms[None, :]
    sim[[PAD, OOV]] = 0.0
    pop = popularity(data)[FIRST_ITEM_ROW:]
    tie_break = pop / (pop.max() + 1.0) * 1e-3  # cold users (no votes) get popularity

    def score(lo: int, hi: int) -> np.ndarray:
        hist = eval_set.hist[lo:hi]
        out = np.zeros((hi - lo, len(pop)), dtype=np.float32)
        for u in range(hi - lo):
            rows = hist[u][hist[u] >= FIRST_ITEM_ROW]
            if len(rows):
                out[u] = sim[rows][:, FIRST_ITEM_ROW:].sum(axis=0)
        return out + tie_break

    return score


def als_scorer(
    data: TrainingData,
    eval_set: EvalSet,
    factors: int = 64,
    iterations: int = 15,
    regularization: float = 0.05,
    alpha: float = 10.0,
    seed: int = 0,
    threads: int = 0,
) -> ScoreFn:
    from implicit.cpu.als import AlternatingLeastSquares  # heavy import, only for evaluation

    counts = _user_item_matrix(data)  # duplicates (user, item) sum to interaction counts
    counts.sum_duplicates()
    with warnings.catch_warnings():
        # implicit warns about OpenBLAS threads; the caller limits BLAS to one thread around this.
        warnings.filterwarnings("ignore", message=".*OpenBLAS.*", category=RuntimeWarning)
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            random_state=seed,
            num_threads=threads,
        )
        model.fit(counts, show_progress=False)
    user_factors = np.asarray(model.user_factors)
    item_factors = np.asarray(model.item_factors)[FIRST_ITEM_ROW:]
    code_of = {u: k for k, u in enumerate(data.user_ids)}
    codes = np.asarray([code_of.get(u, -1) for u in eval_set.user])
    pop = popularity(data)[FIRST_ITEM_ROW:]

    def score(lo: int, hi: int) -> np.ndarray:
        out = np.empty((hi - lo, len(pop)), dtype=np.float32)
        for u in range(hi - lo):
            code = codes[lo + u]
            out[u] = user_factors[code] @ item_factors.T if code >= 0 else pop
        return out

    return score
