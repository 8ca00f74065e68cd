"""Ranking metrics with full ranking over every known item.

Per evaluated user the target is the set of items of their next instant after the cut
(binary relevance). HR@k: 1 if any target is in the top k. NDCG@k: DCG of the top k over the
best DCG possible with that many targets. Both are averaged over users.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from models.data import EvalSet
from models.vocab import FIRST_ITEM_ROW

K = 10
# Score of user rows ``lo:hi`` -> ``(hi - lo) x (V - FIRST_ITEM_ROW)``: one column per known item row.
ScoreFn = Callable[[int, int], torch.Tensor | np.ndarray]


def hit_and_ndcg(
    top_rows: np.ndarray, targets: list[np.ndarray], k: int = K
) -> tuple[np.ndarray, np.ndarray]:
    """``top_rows``: ``U x >=k`` item rows, best first; ``targets``: the relevant rows per user.

    Returns per-user (hits, ndcgs)."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    hits = np.zeros(len(targets))
    ndcg = np.zeros(len(targets))
    for u, relevant in enumerate(targets):
        rel = np.isin(top_rows[u, :k], relevant)
        if rel.any():
            hits[u] = 1.0
            ideal = discounts[: min(len(relevant), k)].sum()
            ndcg[u] = float((rel * discounts).sum() / ideal)
    return hits, ndcg


def evaluate_scores(eval_set: EvalSet, score: ScoreFn, chunk: int = 256, k: int = K) -> dict[str, np.ndarray]:
    """Run ``score`` over all users in chunks -> per-user ``hit`` and ``ndcg`` arrays."""
    hits, ndcgs = [], []
    for lo in range(0, len(eval_set), chunk):
        hi = min(lo + chunk, len(eval_set))
        s = score(lo, hi)
        s = torch.as_tensor(s, dtype=torch.float32)
        top = torch.topk(s, k, dim=1).indices.numpy() + FIRST_ITEM_ROW
        h, n = hit_and_ndcg(top, [eval_set.targets(u) for u in range(lo, hi)], k)
        hits.append(h)
        ndcgs.append(n)
    return {
        "hit": np.concatenate(hits) if hits else np.zeros(0),
        "ndcg": np.concatenate(ndcgs) if ndcgs else np.zeros(0),
    }


def summarize(per_user: dict[str, np.ndarray], cold: np.ndarray, k: int = K) -> dict[str, float]:
    """Per-user arrays -> ``hr@k``, ``ndcg@k`` over all users, and the same over warm and cold users."""
    out: dict[str, float] = {}
    for name, mask in (("", np.ones_like(cold, dtype=bool)), ("warm_", ~cold), ("cold_", cold)):
        n = int(mask.sum())
        out[f"{name}hr@{k}"] = float(per_user["hit"][mask].mean()) if n else float("nan")
        out[f"{name}ndcg@{k}"] = float(per_user["ndcg"][mask].mean()) if n else float("nan")
    return out
