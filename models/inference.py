"""The inference API the ranking service calls: :class:`Ranker` scores batches of requests.

A batch is routed per request (:class:`~models.router.PathRouter`), then each path runs ONE
forward pass for all its requests: candidates are packed per request and padded only to the
batch's longest candidate list and history, into buffers reused across calls (one set per thread,
so concurrent batches never share one). Everything runs under ``torch.inference_mode()``.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.compiled import CompiledPaths
from models.features import ITEM_DENSE_DIM, USER_DENSE_DIM, item_dense, user_dense
from models.model import RankBatch, TwoPathRanker
from models.router import PathRouter
from models.vocab import PAD, ItemVocab

# Compiled graphs are traced at warm-up for the cascade heads of requests up to this size (the
# server's default candidate limit); a larger head is traced on first use.
WARM_CANDIDATES = 1_000


@dataclass
class RankInput:
    """One request's features, as the stream consumer keeps them (raw, untransformed)."""

    recent_items: Sequence[str]  # newest first (may be empty: a cold user)
    user_counts: tuple[float, float, float]  # lifetime views, add_to_carts, purchases
    seconds_since_last_event: float | None  # None: the user has no event yet
    candidates: Sequence[str]
    # float32 ``len(candidates) x 4``: views, add_to_carts, purchases, trending; zeros for unknown items
    item_stats: np.ndarray


@dataclass
class RankOutput:
    scores: np.ndarray  # float32, len(candidates), higher is better, in the order of the candidates
    path: str  # "light" | "full" | "cascade"


class _Buffers:
    """Growable padded input arrays; the tensors handed to the model are views into them."""

    def __init__(self) -> None:
        self.hist = np.zeros((0, 0), dtype=np.int64)
        self.cand = np.zeros((0, 0), dtype=np.int64)
        self.item = np.zeros((0, 0, ITEM_DENSE_DIM), dtype=np.float32)
        self.user = np.zeros((0, USER_DENSE_DIM), dtype=np.float32)

    def views(self, b: int, h: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if b > self.hist.shape[0] or h > self.hist.shape[1]:
            self.hist = np.zeros((max(b, self.hist.shape[0]), max(h, self.hist.shape[1], 1)), dtype=np.int64)
        if b > self.cand.shape[0] or c > self.cand.shape[1]:
            rows, cols = max(b, self.cand.shape[0]), max(c, self.cand.shape[1])
            self.cand = np.zeros((rows, cols), dtype=np.int64)
            self.item = np.zeros((rows, cols, ITEM_DENSE_DIM), dtype=np.float32)
        if b > self.user.shape[0]:
            self.user = np.zeros((b, USER_DENSE_DIM), dtype=np.float32)
        return self.hist[:b, :h], self.cand[:b, :c], self.item[:b, :c], self.user[:b]


@dataclass
class _Prepared:
    """One request mapped to model rows, computed once per call and shared by every path."""

    hist: np.ndarray  # int64 rows, newest first
    cand: np.ndarray  # int64 rows
    item: np.ndarray  # float32 n x Fi, transformed
    user: np.ndarray  # float32 Fu, transformed


class Ranker:
    """A loaded model version. Thread-safe: the model is read-only and buffers are per thread."""

    def __init__(
        self,
        model: TwoPathRanker,
        vocab: ItemVocab,
        config: dict[str, Any],
        version: str,
        router: PathRouter,
        catalogue_stats: np.ndarray | None = None,
        device: str = "cpu",
        quantized: bool = False,
        compiled: bool = False,
    ) -> None:
        self.model = model.eval()
        self.model.prepare_inference()
        self.vocab = vocab
        self.config = config
        self.version = version
        self.router = router
        self.device = torch.device(device)
        self.quantized = quantized
        self.history_len = model.config.light.history_len
        self._local = threading.local()
        # TorchScript graphs of the paths (models.compiled) where the model can be traced.
        self.compiled = CompiledPaths(model) if compiled and CompiledPaths.supported(model) else None
        # For candidate generation: every known item that may be recommended (service lines such
        # as postage may not: vocab.recommendable), with its counters as of the end of training.
        stats = catalogue_stats if catalogue_stats is not None else np.zeros((len(vocab), ITEM_DENSE_DIM))
        rows = np.flatnonzero(vocab.recommendable_rows())
        self._all_rows = torch.from_numpy(rows).to(self.device)
        self._all_item_dense = torch.from_numpy(item_dense(stats[rows])).to(self.device)

    # -- public API -----------------------------------------------------------------------------
    def rank_batch(
        self, inputs: list[RankInput], load: float = 0.0, force_path: str | None = None
    ) -> list[RankOutput]:
        """Score each request's candidates. One forward pass per path used in the batch."""
        if not inputs:
            return []
        prepared = self._prepare(inputs)
        routes = [self.router.route(len(p.hist) > 0, len(p.cand), load, force_path) for p in prepared]
        scores: list[np.ndarray | None] = [None] * len(inputs)
        groups = {
            path: [i for i, r in enumerate(routes) if r.path == path] for path in ("light", "cascade", "full")
        }
        if groups["cascade"] and groups["light"]:
            # Light requests ride along in the cascade pass with an empty head (their scores are the
            # light scores): one pass fewer, whose fixed cost outweighs a head's worth of residuals.
            groups["cascade"] = sorted(groups["cascade"] + groups.pop("light"))
        with torch.inference_mode():
            for path, ids in groups.items():
                if ids:
                    heads = [routes[i].head for i in ids] if path == "cascade" else None
                    for i, s in zip(ids, self._forward(path, [prepared[i] for i in ids], heads), strict=True):
                        scores[i] = s
        return [RankOutput(scores=s, path=r.path) for s, r in zip(scores, routes, strict=True)]  # type: ignore[arg-type]

    def candidates(self, recent_items: Sequence[str], k: int, exclude: set[str] | None = None) -> list[str]:
        """Up to ``k`` item ids for a user: the light path over the whole catalogue, scored from the
        user's recent items (embedding neighbours, repeat items) and each item's counters as of the
        end of training; a cold user gets the most popular items. Never an item flagged not
        recommendable (``Rank`` still scores whatever candidates it is given)."""
        if k <= 0 or len(self._all_rows) == 0:
            return []
        exclude = exclude or set()
        hist = self.vocab.rows(list(recent_items)[: self.history_len])
        hist = hist[hist != PAD]
        with torch.inference_mode():
            batch = RankBatch(
                hist=torch.from_numpy(hist).to(self.device).unsqueeze(0),
                user_dense=torch.zeros(1, USER_DENSE_DIM, device=self.device),
                cand=self._all_rows,
                item_dense=self._all_item_dense,
            )
            scores = self.model.light(batch)[0]
            want = min(len(self._all_rows), k + len(exclude))
            top = self._all_rows[torch.topk(scores, want).indices].cpu().tolist()
        out: list[str] = []
        for idx in top:
            item = self.vocab.item(idx)
            if item is not None and item not in exclude:
                out.append(item)
                if len(out) == k:
                    break
        return out

    def warmup(self) -> None:
        """Run every path at a few batch shapes so first requests do not pay for lazy initialisation
        (and trace the compiled graphs for every cascade head the router can choose)."""
        if self.compiled is not None:
            self.compiled.warmup(self.router.heads(WARM_CANDIDATES))
        known = self.vocab.item_ids[: self.history_len] or ["warmup-unknown"]
        cands = (self.vocab.item_ids * (100 // max(len(self.vocab.item_ids), 1) + 1))[:100] or ["x"]
        for n in (1, 8):
            inputs = [
                RankInput(
                    known, (3.0, 1.0, 1.0), 60.0, cands, np.ones((len(cands), ITEM_DENSE_DIM), np.float32)
                )
                for _ in range(n)
            ]
            for path in ("light", "full", "cascade"):
                self.rank_batch(inputs, force_path=path)
        self.candidates(known, 10)

    # -- internals ------------------------------------------------------------------------------
    def _prepare(self, inputs: list[RankInput]) -> list[_Prepared]:
        counts = np.asarray([inp.user_counts for inp in inputs], dtype=np.float32).reshape(-1, 3)
        since = np.asarray(
            [
                math.nan if inp.seconds_since_last_event is None else inp.seconds_since_last_event
                for inp in inputs
            ],
            dtype=np.float32,
        )
        users = user_dense(counts, since)
        sizes = [len(inp.candidates) for inp in inputs]
        stats = [np.asarray(inp.item_stats, dtype=np.float32).reshape(-1, ITEM_DENSE_DIM) for inp in inputs]
        for s, n in zip(stats, sizes, strict=True):
            if s.shape[0] != n:
                raise ValueError(f"item_stats has {s.shape[0]} rows for {n} candidates")
        items = item_dense(np.concatenate(stats)) if stats else np.zeros((0, ITEM_DENSE_DIM), np.float32)
        rows = self.vocab.rows(itertools.chain.from_iterable(inp.candidates for inp in inputs))
        out, start = [], 0
        L = self.history_len
        for k, inp in enumerate(inputs):
            hist = self.vocab.rows(inp.recent_items[:L]) if len(inp.recent_items) else np.zeros(0, np.int64)
            n = sizes[k]
            out.append(_Prepared(hist, rows[start : start + n], items[start : start + n], users[k]))
            start += n
        return out

    def _buffers(self, slot: str) -> _Buffers:
        local = self._local.__dict__
        if slot not in local:
            local[slot] = _Buffers()
        return local[slot]

    def _batch(self, slot: str, group: list[_Prepared]) -> RankBatch:
        """Pack ``group`` into padded tensors (to its longest history and candidate list)."""
        b = len(group)
        # At least one history slot (padding when nobody has history): every path masks it, and a
        # compiled graph is traced for a non-empty history axis.
        longest = max(max((len(p.hist) for p in group), default=0), 1)
        c = max((len(p.cand) for p in group), default=0)
        hist, cand, item, user = self._buffers(slot).views(b, longest, c)
        hist.fill(PAD)
        cand.fill(PAD)
        item.fill(0.0)
        for k, p in enumerate(group):
            n = len(p.cand)
            hist[k, : len(p.hist)] = p.hist
            cand[k, :n] = p.cand
            item[k, :n] = p.item
            user[k] = p.user
        to = self.device
        return RankBatch(
            hist=torch.from_numpy(hist).to(to),
            user_dense=torch.from_numpy(user).to(to),
            cand=torch.from_numpy(cand).to(to),
            item_dense=torch.from_numpy(item).to(to),
        )

    def _forward(self, path: str, group: list[_Prepared], heads: list[int] | None) -> list[np.ndarray]:
        """One forward pass of ``path`` for ``group`` -> each request's scores (its own length)."""
        batch = self._batch(path, group)
        if self.compiled is not None:
            head = None if heads is None else torch.tensor(heads, dtype=torch.int64, device=self.device)
            out = self.compiled(path, batch, head, max(heads) if heads else None)
        elif path == "light":
            out = self.model.light(batch)
        elif path == "full":
            out = self.model.full(batch)
        else:
            out = self.model.cascade(batch, torch.tensor(heads, dtype=torch.int64, device=self.device))
        scores = out.float().cpu().numpy()
        return [scores[k, : len(p.cand)].copy() for k, p in enumerate(group)]
