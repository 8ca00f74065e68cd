"""Quality of the model (per path, fp32 and int8) and of the baselines, on one evaluation set.

Protocol (also in docs/MODEL.md): per user with an interaction at or after the cut (guests
excluded), the target is the set of items of the user's first instant after the cut (for Online
Retail: their next invoice), the user's features are those at the cut, and every known item is
ranked (no sampled negatives). Targets unknown to training are dropped (no model can rank them).

*routed* is what the server does at no load: cold users take the light path, warm users the
cascade (light over everything, full re-scores the light head).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from models import baselines, metrics
from models.data import EvalSet, TrainingData
from models.model import RankBatch, TwoPathRanker, path_macs
from models.router import PathRouter, RouterConfig
from models.vocab import FIRST_ITEM_ROW

log = logging.getLogger(__name__)


def model_scorer(model: TwoPathRanker, eval_set: EvalSet, path: str, head: int = 20) -> metrics.ScoreFn:
    """``head``: the cascade's head for a request over the whole catalogue (see PathRouter.head_for)."""
    """Scores over every known item for eval users ``lo:hi`` along ``path`` (light | full | routed)."""
    V = eval_set.item_dense.shape[0]
    rows = torch.arange(FIRST_ITEM_ROW, V)
    item_dense = torch.from_numpy(eval_set.item_dense[FIRST_ITEM_ROW:])
    cold = eval_set.cold

    def batch(lo: int, hi: int, cand: torch.Tensor, dense: torch.Tensor) -> RankBatch:
        return RankBatch(
            torch.from_numpy(eval_set.hist[lo:hi]), torch.from_numpy(eval_set.user_dense[lo:hi]), cand, dense
        )

    def score(lo: int, hi: int) -> torch.Tensor:
        with torch.inference_mode():
            light = model.light(batch(lo, hi, rows, item_dense))
            if path == "light":
                return light
            if path == "full":
                return model.full(batch(lo, hi, rows, item_dense), light_scores=light)
            h = min(head, light.shape[1])
            top = torch.topk(light, h, dim=1).indices  # B x h
            full_head = model.full(
                batch(lo, hi, rows[top], item_dense[top]), light_scores=light.gather(1, top)
            )
            out = light.clone()
            warm = torch.from_numpy(~cold[lo:hi])
            # The head stays above the tail; inside it, the full path orders.
            lifted = full_head - full_head.amin(dim=1, keepdim=True) + light.amax(dim=1, keepdim=True) + 1.0
            out[warm] = out[warm].scatter(1, top[warm], lifted[warm])
            return out

    return score


def routed_compute(
    config_model, eval_set: EvalSet, router: RouterConfig, n_candidates: int
) -> dict[str, float]:
    """Mean multiply-adds per request of always-full vs routed (at no load) for ``n_candidates``."""
    macs = path_macs(config_model, history_len=config_model.light.history_len)
    cold = eval_set.cold
    light = macs["light_per_user"] + n_candidates * macs["light_per_candidate"]
    full = macs["full_per_user"] + n_candidates * macs["full_per_candidate"]
    head = PathRouter(router).head_for(n_candidates)
    cascade = (
        light + macs["full_per_user"] + head * (macs["full_per_candidate"] - macs["light_per_candidate"])
    )
    if n_candidates <= head:
        cascade = full
    routed = float(np.where(cold, light, cascade).mean()) if len(cold) else cascade
    return {
        "candidates": n_candidates,
        "cascade_head": head,
        "always_full_macs": full,
        "routed_macs": routed,
        "light_macs": light,
        "reduction": 1.0 - routed / full,
        "cold_share": float(cold.mean()) if len(cold) else 0.0,
    }


def evaluate_model(
    model: TwoPathRanker, eval_set: EvalSet, paths=("light", "full", "routed"), head: int = 20
) -> dict[str, dict[str, float]]:
    out = {}
    model.eval().prepare_inference()
    for path in paths:
        started = time.perf_counter()
        chunk = 256 if path == "light" else 16 if path == "full" else 128
        per_user = metrics.evaluate_scores(eval_set, model_scorer(model, eval_set, path, head), chunk=chunk)
        out[path] = metrics.summarize(per_user, eval_set.cold)
        out[path]["seconds"] = round(time.perf_counter() - started, 2)
    return out


def served_scorer(graph: Any, eval_set: EvalSet, head: int) -> metrics.ScoreFn:
    """Like ``model_scorer(..., "routed")``, but through the compiled served graph (models.aoti):
    every item of the vocabulary as each user's candidates, the head for warm users, 0 for cold."""
    V = eval_set.item_dense.shape[0]
    rows = torch.arange(FIRST_ITEM_ROW, V)
    item_dense = torch.from_numpy(eval_set.item_dense[FIRST_ITEM_ROW:])
    h = min(head, len(rows))
    slots = torch.empty(max(h, 1), dtype=torch.int8)

    def score(lo: int, hi: int) -> torch.Tensor:
        b = hi - lo
        warm = torch.from_numpy(~eval_set.cold[lo:hi])
        with torch.inference_mode():
            return graph(
                torch.from_numpy(eval_set.hist[lo:hi]).contiguous(),
                torch.from_numpy(eval_set.user_dense[lo:hi]).contiguous(),
                rows.expand(b, -1).contiguous(),
                item_dense.expand(b, -1, -1).contiguous(),
                torch.where(warm, h, 0).to(torch.int64),
                slots,
            )

    return score


def served_form_quality(
    graph: Any, data: TrainingData, router: RouterConfig, reference: dict[str, float]
) -> dict[str, Any]:
    """NDCG@10 and HR@10 of the compiled served graph, routed as at no load, against ``reference``
    (the eager int8 model's routed figures): the served form must not move quality."""
    eval_set = data.eval
    if eval_set is None or len(eval_set) == 0:
        return {"evaluated": False}
    head = PathRouter(router).head_for(len(data.vocab) - FIRST_ITEM_ROW)
    started = time.perf_counter()
    per_user = metrics.evaluate_scores(eval_set, served_scorer(graph, eval_set, head), chunk=32)
    out: dict[str, Any] = {"evaluated": True, **metrics.summarize(per_user, eval_set.cold)}
    out["seconds"] = round(time.perf_counter() - started, 2)
    ref = reference.get("ndcg@10")
    out["eager_int8_ndcg@10"] = ref
    out["ndcg@10_relative_diff"] = abs(out["ndcg@10"] - ref) / ref if ref else None
    return out


def evaluate_baselines(data: TrainingData, eval_set: EvalSet, seed: int = 0) -> dict[str, dict[str, float]]:
    from threadpoolctl import threadpool_limits

    out = {}
    scorers = {
        "popularity": lambda: baselines.popularity_scorer(data),
        "cooccurrence": lambda: baselines.cooccurrence_scorer(data, eval_set),
        "als": lambda: baselines.als_scorer(data, eval_set, seed=seed, threads=torch.get_num_threads()),
    }
    with threadpool_limits(1, "blas"):  # implicit's own threads do the work; BLAS threads would fight them
        for name, make in scorers.items():
            started = time.perf_counter()
            per_user = metrics.evaluate_scores(eval_set, make())
            out[name] = metrics.summarize(per_user, eval_set.cold)
            out[name]["seconds"] = round(time.perf_counter() - started, 2)
    return out


def quality_report(
    data: TrainingData, fp32: TwoPathRanker, int8: TwoPathRanker, router: RouterConfig, seed: int = 0
) -> dict[str, Any]:
    """Everything quality-related for metrics.json; ``{}`` sections when there is no evaluation set."""
    eval_set = data.eval
    if eval_set is None or len(eval_set) == 0:
        return {"evaluated": False, "reason": "no events at or after --until in the given logs"}
    head = PathRouter(router).head_for(len(data.vocab) - FIRST_ITEM_ROW)
    result: dict[str, Any] = {
        "evaluated": True,
        "users": len(eval_set),
        "cold_users": int(eval_set.cold.sum()),
        "baselines": evaluate_baselines(data, eval_set, seed),
        "model": {
            "fp32": evaluate_model(fp32, eval_set, head=head),
            "int8": evaluate_model(int8, eval_set, head=head),
        },
        "compute": {
            "full_ranking": routed_compute(fp32.config, eval_set, router, len(data.vocab) - FIRST_ITEM_ROW),
            "100_candidates": routed_compute(fp32.config, eval_set, router, 100),
        },
    }
    return result
