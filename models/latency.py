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


def synthetic_requests(
    ranker: Ranker, n: int, n_candidates: int = 100, seed: int = 0, history: int | None = None
) -> list[RankInput]:
    """``n`` returning shoppers: ``history`` (default: the model's whole history) distinct known
    recent items, nonzero counters, ``n_candidates`` candidates each."""
    rng = np.random.default_rng(seed)
    items = ranker.vocab.item_ids or ["unknown"]
    L = ranker.history_len if history is None else history
    out = []
    for _ in range(n):
        hist = [items[i] for i in rng.choice(len(items), size=min(L, len(items)), replace=False)]
        cands = [items[i] for i in rng.integers(0, len(items), size=n_candidates)]
        stats = rng.gamma(1.0, 20.0, size=(n_candidates, ITEM_DENSE_DIM)).astype(np.float32)
        out.append(RankInput(hist, (20.0, 3.0, 2.0), 3600.0, cands, stats))
    return out


def measure(
    rankers: dict[str, Ranker],
    paths: tuple[str, ...] = ("light", "full", "cascade"),
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    n_candidates: int = 100,
    min_seconds: float = 0.2,
    min_reps: int = 5,
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """-> ``{name: {path: {batch_size: {"p50_ms", "mean_ms", "per_request_us"}}}}`` for ONE
    ``rank_batch`` call. The rankers run interleaved, call by call, so a machine busy with other
    work slows each of them alike and their ratio stays meaningful."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {name: {} for name in rankers}
    first = next(iter(rankers.values()))
    for path in paths:
        for b in batch_sizes:
            inputs = synthetic_requests(first, b, n_candidates, seed=b)
            times: dict[str, list[float]] = {name: [] for name in rankers}
            order = list(rankers.items())
            for _, ranker in order:
                ranker.rank_batch(inputs, force_path=path)  # warm the buffers for this shape
            started = time.perf_counter()
            rounds = 0
            while rounds < 1000 and (rounds < min_reps or time.perf_counter() - started < min_seconds):
                shift = rounds % len(order)  # rotate who goes first: nobody always meets a cold cache
                for name, ranker in order[shift:] + order[:shift]:
                    t0 = time.perf_counter()
                    ranker.rank_batch(inputs, force_path=path)
                    times[name].append(time.perf_counter() - t0)
                rounds += 1
            for name, values in times.items():
                arr = np.asarray(values) * 1000.0
                out[name].setdefault(path, {})[str(b)] = {
                    "p50_ms": round(float(np.median(arr)), 3),
                    "mean_ms": round(float(arr.mean()), 3),
                    "per_request_us": round(float(np.median(arr)) * 1000.0 / b, 1),
                }
    return out
