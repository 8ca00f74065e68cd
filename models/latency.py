"""Forward-pass latency of a :class:`~models.inference.Ranker` per path and batch size.

Requests are synthetic but shaped like the server's: ``n_candidates`` known items each, a full
history of recent items, nonzero counters. Measured on the calling thread with the torch thread
count the caller set (the ranking server uses one).
"""

from __future__ import annotations

import time

import numpy as np

from models.features import ITEM_DENSE_DIM
from models.inference import Ranker, RankInput

BATCH_SIZES = (1, 8, 32, 128)


def synthetic_requests(ranker: Ranker, n: int, n_candidates: int = 100, seed: int = 0) -> list[RankInput]:
    rng = np.random.default_rng(seed)
    items = ranker.vocab.item_ids or ["unknown"]
    L = ranker.history_len
    out = []
    for _ in range(n):
        hist = [items[i] for i in rng.choice(len(items), size=min(L, len(items)), replace=False)]
        cands = [items[i] for i in rng.integers(0, len(items), size=n_candidates)]
        stats = rng.gamma(1.0, 20.0, size=(n_candidates, ITEM_DENSE_DIM)).astype(np.float32)
        out.append(RankInput(hist, (20.0, 3.0, 2.0), 3600.0, cands, stats))
    return out


def measure(
    ranker: Ranker,
    paths: tuple[str, ...] = ("light", "full", "cascade"),
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    n_candidates: int = 100,
    min_seconds: float = 0.2,
    min_reps: int = 3,
) -> dict[str, dict[str, dict[str, float]]]:
    """-> ``{path: {batch_size: {"p50_ms", "mean_ms", "per_request_us"}}}`` for ONE ``rank_batch`` call."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for path in paths:
        out[path] = {}
        for b in batch_sizes:
            inputs = synthetic_requests(ranker, b, n_candidates, seed=b)
            ranker.rank_batch(inputs, force_path=path)  # warm the buffers for this shape
            times: list[float] = []
            started = time.perf_counter()
            while len(times) < min_reps or time.perf_counter() - started < min_seconds:
                t0 = time.perf_counter()
                ranker.rank_batch(inputs, force_path=path)
                times.append(time.perf_counter() - t0)
                if len(times) >= 1000:
                    break
            arr = np.asarray(times) * 1000.0
            out[path][str(b)] = {
                "p50_ms": round(float(np.median(arr)), 3),
                "mean_ms": round(float(arr.mean()), 3),
                "per_request_us": round(float(np.median(arr)) * 1000.0 / b, 1),
            }
    return out
