"""TorchScript forms of the three paths: the served forward without Python's per-op cost.

A cascade forward for one request is ~340 torch ops. Run eagerly, Python's dispatch of each op
costs more than the op itself at serving sizes (one to a few requests of 100 candidates): a
traced and frozen graph ran the same cascade 2.4x faster on this CPU, bit-for-bit within
float32 rounding. Larger batches gain less; they amortise the per-op cost anyway.

Each path is traced once per model version (:meth:`CompiledPaths.warmup`, before the version
serves) with inputs of general shape, so one graph serves any number of requests, candidates
and history slots. Two things are constants of a trace and therefore part of its key:

* the cascade's head size ``h`` (the largest head in the batch: ``topk`` takes it as an int).
  The router only produces ``min_head..cascade_head`` and the fraction of long lists, so a
  handful of graphs covers every batch; an unseen ``h`` is traced on first use (~50 ms once);
* a non-empty history axis: batches are always packed with at least one history slot (an
  empty slot is padding, which every path masks).

Only a model with the plain interaction MLP is traced; one whose MLP is ``torch.ao`` dynamic int8
(``--dense-runtime torch-dynamic``, kept for comparison) runs eagerly (:meth:`CompiledPaths.supported`).
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from models.model import InteractionMLP, RankBatch, TwoPathRanker
from models.vocab import FIRST_ITEM_ROW

log = logging.getLogger(__name__)


class _Light(nn.Module):
    def __init__(self, model: TwoPathRanker) -> None:
        super().__init__()
        self.model = model

    def forward(self, hist: Tensor, user: Tensor, cand: Tensor, item: Tensor) -> Tensor:
        return self.model.light(RankBatch(hist, user, cand, item))


class _Full(_Light):
    def forward(self, hist: Tensor, user: Tensor, cand: Tensor, item: Tensor) -> Tensor:
        return self.model.full(RankBatch(hist, user, cand, item))


class _Cascade(nn.Module):
    def __init__(self, model: TwoPathRanker) -> None:
        super().__init__()
        self.model = model

    def forward(self, hist: Tensor, user: Tensor, cand: Tensor, item: Tensor, head: Tensor) -> Tensor:
        return self.model.cascade(RankBatch(hist, user, cand, item), head)


class CompiledPaths:
    """Traced, frozen forward graphs of one model, keyed by path (and cascade head). Thread-safe."""

    def __init__(self, model: TwoPathRanker) -> None:
        self._model = model
        self._graphs: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    @staticmethod
    def supported(model: TwoPathRanker) -> bool:
        """The interaction MLP is the plain one (not ``torch.ao`` dynamic int8, which runs eagerly)."""
        return isinstance(model.mlp, InteractionMLP)

    @property
    def traced(self) -> list[tuple[str, int]]:
        return sorted(self._graphs)

    def warmup(self, heads: range | list[int]) -> None:
        """Trace the light and full paths and the cascade for each head size in ``heads``."""
        self._graph("light", 0)
        self._graph("full", 0)
        for h in heads:
            self._graph("cascade", h)

    def __call__(
        self, path: str, batch: RankBatch, head: Tensor | None = None, head_max: int | None = None
    ) -> Tensor:
        """Scores of ``path`` for ``batch``; the cascade takes each request's ``head`` (and their
        maximum, ``head_max``, when the caller knows it: saves a tensor reduction)."""
        if path == "cascade":
            assert head is not None
            if head_max is None:
                head_max = int(head.max()) if head.numel() else 0
            h = min(head_max, batch.cand.shape[1])
            if h == 0:
                return self._graph("light", 0)(batch.hist, batch.user_dense, batch.cand, batch.item_dense)
            return self._graph("cascade", h)(batch.hist, batch.user_dense, batch.cand, batch.item_dense, head)
        return self._graph(path, 0)(batch.hist, batch.user_dense, batch.cand, batch.item_dense)

    # -- tracing --------------------------------------------------------------------------------
    def _graph(self, path: str, h: int) -> Any:
        key = (path, h)
        graph = self._graphs.get(key)
        if graph is None:
            with self._lock:
                graph = self._graphs.get(key)
                if graph is None:
                    graph = self._graphs[key] = self._trace(path, h)
        return graph

    def _trace(self, path: str, h: int) -> Any:
        # General example shapes (nothing 1 or equal to another axis), so no size is specialised.
        B, L, C = 3, 7, max(h + 5, 11)
        m = self._model
        rows = m.config.embedding.num_rows
        gen = torch.Generator().manual_seed(0)
        hist = torch.randint(FIRST_ITEM_ROW, max(rows, FIRST_ITEM_ROW + 1), (B, L), generator=gen)
        hist[0, L // 2 :] = 0  # padding, as in a real batch
        cand = torch.randint(FIRST_ITEM_ROW, max(rows, FIRST_ITEM_ROW + 1), (B, C), generator=gen)
        cand[1, C - 2 :] = 0
        user = torch.rand(B, m.config.user_dense_dim, generator=gen)
        item = torch.rand(B, C, m.config.item_dense_dim, generator=gen)
        if path == "cascade":
            module: nn.Module = _Cascade(m)
            inputs: tuple[Tensor, ...] = (hist, user, cand, item, torch.full((B,), h, dtype=torch.int64))
        else:
            module = _Light(m) if path == "light" else _Full(m)
            inputs = (hist, user, cand, item)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about every Python int it freezes; the ones here are by design
            # (the head size, the non-empty history axis), see the module docstring.
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module.eval(), inputs, check_trace=False)
            graph = torch.jit.freeze(traced)
            expected = module(*inputs)
            got = graph(*inputs)
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"traced {path} path (head {h}) disagrees with the eager model")
        log.debug("traced the %s path (head %d)", path, h)
        return graph
