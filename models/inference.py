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

_NO_ROWS = np.zeros(0, dtype=np.int64)
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
    """Growable flat input arrays; the tensors handed to the model are contiguous views of them
    (a compiled graph assumes dense strides: a slice of a wider buffer would be read wrongly)."""

    def __init__(self) -> None:
        self.hist = np.zeros(0, dtype=np.int64)
        self.cand = np.zeros(0, dtype=np.int64)
        self.item = np.zeros(0, dtype=np.float32)
        self.user = np.zeros(0, dtype=np.float32)

    @staticmethod
    def _grown(buffer: np.ndarray, size: int) -> np.ndarray:
        return buffer if buffer.size >= size else np.zeros(max(size, 2 * buffer.size), dtype=buffer.dtype)

    def views(self, b: int, h: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self.hist = self._grown(self.hist, b * h)
        self.cand = self._grown(self.cand, b * c)
        self.item = self._grown(self.item, b * c * ITEM_DENSE_DIM)
        self.user = self._grown(self.user, b * USER_DENSE_DIM)
        return (
            self.hist[: b * h].reshape(b, h),
            self.cand[: b * c].reshape(b, c),
            self.item[: b * c * ITEM_DENSE_DIM].reshape(b, c, ITEM_DENSE_DIM),
            self.user[: b * USER_DENSE_DIM].reshape(b, USER_DENSE_DIM),
        )


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
        served: Any = None,
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
        # The AOTInductor graph of every path (models.aoti), when the version holds one that runs
        # here: one call per batch. Else TorchScript graphs of the paths (models.compiled) where the
        # model can be traced, else eager.
        self.served = served
        self.compiled = (
            CompiledPaths(model) if served is None and compiled and CompiledPaths.supported(model) else None
        )
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
        if self.served is not None:
            return self._rank_served(inputs, load, force_path)
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

    @property
    def form(self) -> str:
        """How this version's forward passes run: aoti | torchscript | eager."""
        return "aoti" if self.served is not None else "torchscript" if self.compiled is not None else "eager"

    def _rank_served(self, inputs: list[RankInput], load: float, force_path: str | None) -> list[RankOutput]:
        """Every request of the batch in one call of the compiled graph: light is a head of 0,
        full a head of every candidate (see models.aoti). The padded inputs are written straight
        into this thread's buffers, and the transforms run once over the whole batch."""
        L = self.history_len
        rows_of = self.vocab.rows
        hists = [rows_of(inp.recent_items[:L]) if len(inp.recent_items) else _NO_ROWS for inp in inputs]
        sizes = [len(inp.candidates) for inp in inputs]
        route = self.router.route
        routes = [route(len(h) > 0, n, load, force_path) for h, n in zip(hists, sizes, strict=True)]
        heads = [
            0 if r.path == "light" else n if r.path == "full" else r.head
            for r, n in zip(routes, sizes, strict=True)
        ]
        b = len(inputs)
        c = max(max(sizes), 2)  # the graph's candidate axis starts at 2; the extra slot is padding
        hist, cand, item, user = self._buffers("served").views(b, max(max(map(len, hists)), 1), c)
        hist.fill(PAD)
        cand.fill(PAD)
        item.fill(0.0)
        cand_rows = rows_of(itertools.chain.from_iterable(inp.candidates for inp in inputs))
        start = 0
        for k, inp in enumerate(inputs):
            n = sizes[k]
            hist[k, : len(hists[k])] = hists[k]
            cand[k, :n] = cand_rows[start : start + n]
            item[k, :n] = inp.item_stats
            start += n
        item_dense(item, out=item)  # in place, over the whole batch (padding zeros stay zeros)
        user[:] = user_dense(
            [inp.user_counts for inp in inputs],
            [
                math.nan if inp.seconds_since_last_event is None else inp.seconds_since_last_event
                for inp in inputs
            ],
        )
        h = min(max(max(heads), 1), c)
        with torch.inference_mode():
            out = self.served(
                torch.from_numpy(hist),
                torch.from_numpy(user),
                torch.from_numpy(cand),
                torch.from_numpy(item),
                torch.tensor(heads, dtype=torch.int64),
                self._head_slots(h),
            )
        scores = out.numpy()
        return [
            RankOutput(scores=scores[k, :n].copy(), path=r.path)
            for k, (n, r) in enumerate(zip(sizes, routes, strict=True))
        ]

    def _head_slots(self, h: int) -> torch.Tensor:
        slots = self._local.__dict__.get("head_slots")
        if slots is None or slots.shape[0] < h:
            slots = self._local.head_slots = torch.empty(max(h, 64), dtype=torch.int8)
        return slots[:h]

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
        # At least two candidate slots: the compiled graph's candidate axis starts at 2 (a size of
        # 1 would be specialised by export); the extra slot is padding.
        c = max(max((len(p.cand) for p in group), default=0), 2)
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
