"""The two-path ranker: one set of item embeddings, a cheap light path and a costlier full path.

* **light**: a recency-weighted mean of the user's recent item embeddings plus a projection of the
  user's counters, dotted with the candidate's embedding, plus biases from the candidate's
  id, its counters and whether the user interacted with it recently. About ``D`` multiply-adds per
  candidate.
* **full**: the light score plus a residual from target attention over the recent items (each
  candidate attends to the history with its own query) and an interaction MLP over the candidate,
  the attended history and the user. About ``(2 L + 2 D) A + (3 D + 5) H1 + H1 H2`` multiply-adds
  per candidate: 100x the light path.

The full path is a residual on the light path, so a cascade (light scores everything, full
re-scores the head) keeps the two on one scale. No per-user embedding: a user is their recent
items and counters, so new users are served from their first event.

Shapes: ``B`` users, ``L`` history slots (newest first, :data:`~models.vocab.PAD` = empty),
``C`` candidates per user, ``D`` embedding width, ``Fu``/``Fi`` user/item dense feature widths.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from feature_store import spec
from models.features import ITEM_DENSE_DIM, USER_DENSE_DIM
from models.vocab import FIRST_ITEM_ROW


@dataclass
class ItemEmbeddingConfig:
    num_rows: int  # vocabulary rows, padding and unknown included (see models.vocab)
    # 64 keeps Online Retail's ~4k items in ~1 MB and a dot product per candidate in a few ns;
    # 32 lost ~3% NDCG, 128 gained nothing measurable.
    dim: int = 64


@dataclass
class LightPathConfig:
    # what the stream consumer keeps per user
    history_len: int = field(default_factory=lambda: spec.RECENT_ITEMS_MAX)


@dataclass
class FullPathConfig:
    # Query/key width of the target attention; values stay D wide. 32 halves the attention cost
    # of 64 with no measurable quality change.
    attention_dim: int = 32
    # Interaction MLP widths. The first layer dominates the path's cost (3D+5 inputs per candidate).
    mlp_hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1  # training only; the MLP overfits the small Online Retail set without it


@dataclass
class RankerConfig:
    embedding: ItemEmbeddingConfig
    light: LightPathConfig = field(default_factory=LightPathConfig)
    full: FullPathConfig = field(default_factory=FullPathConfig)
    user_dense_dim: int = USER_DENSE_DIM
    item_dense_dim: int = ITEM_DENSE_DIM

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankerConfig:
        full = dict(data.get("full", {}))
        if "mlp_hidden" in full:
            full["mlp_hidden"] = tuple(full["mlp_hidden"])
        return cls(
            embedding=ItemEmbeddingConfig(**data["embedding"]),
            light=LightPathConfig(**data.get("light", {})),
            full=FullPathConfig(**full),
            user_dense_dim=int(data.get("user_dense_dim", USER_DENSE_DIM)),
            item_dense_dim=int(data.get("item_dense_dim", ITEM_DENSE_DIM)),
        )


class ItemEmbedding(nn.Module):
    """Item rows -> (embedding, learned per-item bias).

    ``weight``: ``V x D``; ``bias``: ``V``. Padding (row 0) is kept at zero.
    """

    def __init__(self, config: ItemEmbeddingConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(config.num_rows, config.dim) * (1.0 / math.sqrt(config.dim)))
        self.bias = nn.Parameter(torch.zeros(config.num_rows))
        with torch.no_grad():
            self.weight[0].zero_()

    def forward(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``rows``: any shape ``S`` of int64 -> (``S x D`` float32, ``S`` float32)."""
        return nn.functional.embedding(rows, self.weight), self.bias[rows]

    def table(self) -> Tensor:
        """The whole ``V x D`` table in float32 (for scoring every item)."""
        return self.weight


class Int8ItemEmbedding(nn.Module):
    """The int8 form of :class:`ItemEmbedding`: one int8 row and one float32 scale per item.

    Lookups gather int8 rows (a quarter of the memory traffic) and rescale only those rows.
    ``qweight``: ``V x D`` int8, ``scale``: ``V`` float32, ``bias``: ``V`` float32.
    """

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.qweight: Tensor
        self.scale: Tensor
        self.bias: Tensor
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.float32).contiguous())
        self.register_buffer("bias", bias.to(torch.float32).contiguous())

    def forward(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return self.qweight[rows].to(torch.float32) * self.scale[rows].unsqueeze(-1), self.bias[rows]

    def table(self) -> Tensor:
        return self.qweight.to(torch.float32) * self.scale.unsqueeze(-1)


class RecencyPooling(nn.Module):
    """Recency-weighted mean of history embeddings: ``B x L x D`` (+ mask ``B x L``) -> ``B x D``.

    One learned non-negative weight per history slot; a user with no history pools to zeros.
    """

    def __init__(self, history_len: int) -> None:
        super().__init__()
        # Start with weights halving every ~10 slots: the newest items say most about the next one.
        self.slot_logit = nn.Parameter(torch.log(torch.expm1(torch.exp2(-torch.arange(history_len) / 10.0))))

    def forward(self, hist_emb: Tensor, mask: Tensor) -> Tensor:
        L = hist_emb.shape[1]
        w = nn.functional.softplus(self.slot_logit[:L]) * mask  # B x L
        total = w.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return torch.bmm((w / total).unsqueeze(1), hist_emb).squeeze(1)


class RepeatSignal(nn.Module):
    """How recently the user interacted with each candidate: ``B x C`` score, 0 when not in history.

    A learned non-negative weight per history slot; the newest matching slot counts. Repeat
    purchases dominate some shops (Online Retail), and matching ids is far cheaper than learning
    ``e_i . e_i`` large for every item.
    """

    def __init__(self, history_len: int) -> None:
        super().__init__()
        self.slot_logit = nn.Parameter(torch.zeros(history_len))

    def slot_weights(self, L: int, known: Tensor) -> Tensor:
        """``known``: ``B x L`` bool (a real, known item) -> ``B x L`` weights (0 where not known)."""
        return nn.functional.softplus(self.slot_logit[:L]) * known

    def forward(self, hist: Tensor, cand: Tensor) -> Tensor:
        """``hist``: ``B x L``; ``cand``: ``B x C`` (per-user candidates) or ``C`` (shared) -> ``B x C``."""
        B, L = hist.shape
        w = self.slot_weights(L, hist >= FIRST_ITEM_ROW)
        if cand.dim() == 2:
            match = cand.unsqueeze(2) == hist.unsqueeze(1)  # B x C x L
            return (match * w.unsqueeze(1)).amax(dim=2) if L else cand.new_zeros(cand.shape, dtype=w.dtype)
        # Shared candidates (often the whole catalogue): scatter the history into a B x V map once.
        # Known history rows are distinct (recent *distinct* items), so a plain scatter is exact;
        # repeated PAD/OOV slots all carry weight 0.
        num_rows = int(cand.max().item()) + 1 if cand.numel() else 1
        num_rows = max(num_rows, int(hist.max().item()) + 1 if hist.numel() else 1)
        dense = w.new_zeros(B, num_rows)
        if L:
            dense = dense.scatter(1, hist, w)
        return dense[:, cand]


class UserTower(nn.Module):
    """The light path's user vector.

    ``hist_emb B x L x D``, ``mask B x L``, ``user_dense B x Fu`` -> ``B x D``."""

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        self.pool = RecencyPooling(config.light.history_len)
        self.dense = nn.Linear(config.user_dense_dim, config.embedding.dim)

    def forward(self, hist_emb: Tensor, mask: Tensor, user_dense: Tensor) -> Tensor:
        return self.pool(hist_emb, mask) + self.dense(user_dense)


class ItemFeatureBias(nn.Module):
    """Item counters -> a popularity bias: ``... x Fi`` -> ``...``.

    A quadratic in the log-counters: log-popularity is what a softmax over items wants, the square
    bends it. Training scores every item of the catalogue for every context, where a hidden layer
    here cost more than the rest of the light path together.
    """

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(config.item_dense_dim, 1)
        self.square = nn.Linear(config.item_dense_dim, 1, bias=False)
        with torch.no_grad():
            self.square.weight.zero_()

    def forward(self, item_dense: Tensor) -> Tensor:
        return (self.linear(item_dense) + self.square(item_dense * item_dense)).squeeze(-1)


class TargetAttention(nn.Module):
    """Each candidate attends over the user's history with its own query.

    ``query B x C x A`` (from :meth:`queries`), ``hist_emb B x L x D``, ``mask B x L`` -> ``B x C x D``.
    A learned "nothing relevant" slot keeps the softmax defined for users without history.
    """

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        D, A = config.embedding.dim, config.full.attention_dim
        self.query = nn.Linear(D, A, bias=False)
        self.key = nn.Linear(D, A, bias=False)
        self.value = nn.Linear(D, D, bias=False)
        self.slot = nn.Parameter(torch.randn(config.light.history_len, D) * 0.02)  # position in history
        self.null_key = nn.Parameter(torch.zeros(A))
        self.null_value = nn.Parameter(torch.zeros(D))
        self.scale = 1.0 / math.sqrt(A)

    def queries(self, cand_emb: Tensor) -> Tensor:
        """``... x D`` -> ``... x A`` scaled queries (a per-item table at inference)."""
        return self.query(cand_emb) * self.scale

    def forward(self, query: Tensor, hist_emb: Tensor, mask: Tensor) -> Tensor:
        B, L, _ = hist_emb.shape
        h = hist_emb + self.slot[:L]
        k = self.key(h)  # B x L x A
        v = self.value(h)  # B x L x D
        logits = torch.bmm(query, k.transpose(1, 2))  # B x C x L
        logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
        null = (query @ self.null_key).unsqueeze(2)  # B x C x 1
        attn = torch.softmax(torch.cat([logits, null], dim=2), dim=2)
        return torch.bmm(attn[:, :, :L], v) + attn[:, :, L:] * self.null_value


class InteractionMLP(nn.Module):
    """Candidate x user interactions -> residual score ``B x C``.

    Pair inputs (attended history ``a``, ``a * e`` with the candidate embedding ``e``, ``e`` itself,
    the candidate's counters ``Fi`` and the repeat signal) meet user inputs (light user vector,
    counters). The first layer is one ``(3D + Fi + 1) -> H1`` weight applied block by block: the
    ``e`` block is a per-item table at inference (:meth:`item_hidden`), the user block is computed
    once per user, and no concatenated ``B x C x (3D + Fi + 1)`` tensor is ever built.
    """

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        D, hidden = config.embedding.dim, config.full.mlp_hidden
        self.dim = D
        self.pair_in = nn.Linear(3 * D + config.item_dense_dim + 1, hidden[0])
        self.user_in = nn.Linear(D + config.user_dense_dim, hidden[0], bias=False)
        layers: list[nn.Module] = []
        for width_in, width_out in zip(hidden, hidden[1:], strict=False):
            layers += [nn.ReLU(), nn.Dropout(config.full.dropout), nn.Linear(width_in, width_out)]
        layers += [nn.ReLU(), nn.Dropout(config.full.dropout), nn.Linear(hidden[-1], 1)]
        self.rest = nn.Sequential(*layers)

    def item_hidden(self, cand_emb: Tensor) -> Tensor:
        """The candidate-embedding block of the first layer: ``... x D`` -> ``... x H1``."""
        D = self.dim
        return cand_emb @ self.pair_in.weight[:, 2 * D : 3 * D].T

    def forward(
        self,
        attended: Tensor,
        cand_emb: Tensor,
        item_hidden: Tensor,
        item_dense: Tensor,
        rep: Tensor,
        user: Tensor,
    ) -> Tensor:
        D, W = self.dim, self.pair_in.weight
        h = attended @ W[:, :D].T + (attended * cand_emb) @ W[:, D : 2 * D].T + item_hidden
        h = h + item_dense @ W[:, 3 * D : -1].T + rep.unsqueeze(-1) * W[:, -1]
        h = h + (self.user_in(user) + self.pair_in.bias).unsqueeze(1)
        return self.rest(h).squeeze(-1)


class InferenceTables(NamedTuple):
    """Per-item rows precomputed for serving (each ``V x ...`` fp32, contiguous, gathered whole):
    ``emb`` (history), ``light`` = [emb, bias] (light candidates), ``full`` = [emb, bias, scaled
    attention query, first MLP block] (full-path candidates)."""

    emb: Tensor
    light: Tensor
    full: Tensor


class CandidateRows(NamedTuple):
    """What the paths need of each candidate: embedding ``... x D``, bias ``...``, and at inference the
    precomputed attention query ``... x A`` and first-layer block ``... x H1`` (else None)."""

    emb: Tensor
    bias: Tensor
    query: Tensor | None
    hidden: Tensor | None


@dataclass
class RankBatch:
    """Padded model inputs for ``B`` users.

    ``hist``: ``B x L`` int64 rows, newest first, PAD-padded; ``user_dense``: ``B x Fu``;
    ``cand``: ``B x C`` int64 rows (PAD-padded), or ``C`` shared by all users;
    ``item_dense``: ``B x C x Fi`` (or ``C x Fi`` with shared candidates).
    """

    hist: Tensor
    user_dense: Tensor
    cand: Tensor
    item_dense: Tensor


class TwoPathRanker(nn.Module):
    """The ranker. ``light(batch)`` and ``full(batch)`` both return ``B x C`` scores (higher is better).

    ``full(batch, light_scores=...)`` reuses light scores already computed for the same candidates.
    :meth:`prepare_inference` precomputes per-item tables (embedding, bias, attention query,
    first MLP block) so serving gathers one row per candidate instead of recomputing them.
    """

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        self.config = config
        self.items: ItemEmbedding | Int8ItemEmbedding = ItemEmbedding(config.embedding)
        self.user = UserTower(config)
        self.item_bias = ItemFeatureBias(config)
        self.repeat = RepeatSignal(config.light.history_len)
        self.attention = TargetAttention(config)
        self.mlp = InteractionMLP(config)
        # The residual is bounded (|r| < bound, learned): it re-orders what the light path ranks
        # near each other but cannot lift an item the light path put far down, which keeps
        # always-full ranking over a whole catalogue sane where training rarely looked.
        self.residual_bound = nn.Parameter(torch.tensor(math.log(math.expm1(4.0))))
        self._tables: InferenceTables | None = None  # inference only, see prepare_inference

    # -- inference tables -----------------------------------------------------------------------
    def prepare_inference(self, max_bytes: int = 256 << 20) -> bool:
        """Precompute the per-item table (``V x (D + 1 + A + H1)`` fp32) unless it exceeds ``max_bytes``.

        With an int8 item table this dequantizes once here rather than on every lookup: on this CPU
        fp32 gathers and GEMMs from a cache-resident table beat rescaling int8 rows per request.
        Very large catalogues keep computing from the (int8) embedding table. Returns whether a
        table is in use; training (``.train()``) drops it.
        """
        c = self.config
        D = c.embedding.dim
        width = D + (D + 1) + (D + 1 + c.full.attention_dim + c.full.mlp_hidden[0])
        if c.embedding.num_rows * width * 4 > max_bytes:
            self._tables = None
            return False
        with torch.no_grad():
            emb = self.items.table().float().contiguous()
            rows = torch.arange(emb.shape[0], device=emb.device)
            _, bias = self.items(rows)
            light = torch.cat([emb, bias.unsqueeze(1)], dim=1).contiguous()
            full = torch.cat(
                [light, self.attention.queries(emb), self.mlp.item_hidden(emb)], dim=1
            ).contiguous()
            self._tables = InferenceTables(emb, light, full)
        return True

    def train(self, mode: bool = True) -> TwoPathRanker:
        if mode:
            self._tables = None  # weights are about to change
        return super().train(mode)

    def candidate_rows(self, rows: Tensor, full: bool = True) -> CandidateRows:
        """Per-candidate inputs; ``full=False`` gathers only what the light path reads."""
        if self._tables is not None:
            D, A = self.config.embedding.dim, self.config.full.attention_dim
            if not full:
                t = nn.functional.embedding(rows, self._tables.light)
                return CandidateRows(t[..., :D], t[..., D], None, None)
            t = nn.functional.embedding(rows, self._tables.full)
            return CandidateRows(t[..., :D], t[..., D], t[..., D + 1 : D + 1 + A], t[..., D + 1 + A :])
        emb, bias = self.items(rows)
        return CandidateRows(emb, bias, None, None)

    # -- light ----------------------------------------------------------------------------------
    def user_vector(self, hist: Tensor, user_dense: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (user vector ``B x D``, history embeddings ``B x L x D``, history mask ``B x L``)."""
        if self._tables is not None:
            hist_emb = nn.functional.embedding(hist, self._tables.emb)
        else:
            hist_emb = self.items(hist)[0]
        mask = hist != 0
        return self.user(hist_emb, mask, user_dense), hist_emb, mask

    def light(self, batch: RankBatch) -> Tensor:
        u, _, _ = self.user_vector(batch.hist, batch.user_dense)
        rows = self.candidate_rows(batch.cand, full=False)
        return self.light_from(u, rows, self.repeat(batch.hist, batch.cand), batch.item_dense)

    def light_from(self, u: Tensor, rows: CandidateRows, rep: Tensor, item_dense: Tensor) -> Tensor:
        """Light scores from parts: ``u B x D``, candidate rows (``C`` shared or ``B x C``), ``rep B x C``."""
        if rows.emb.dim() == 2:  # shared candidates: one matrix product
            dot = u @ rows.emb.T
        else:
            dot = torch.bmm(rows.emb, u.unsqueeze(2)).squeeze(2)
        return dot + rows.bias + self.item_bias(item_dense) + rep

    # -- full -----------------------------------------------------------------------------------
    def full(self, batch: RankBatch, light_scores: Tensor | None = None) -> Tensor:
        u, hist_emb, mask = self.user_vector(batch.hist, batch.user_dense)
        B = batch.hist.shape[0]
        rows = self.candidate_rows(batch.cand)
        cand, item_dense = batch.cand, batch.item_dense
        if cand.dim() == 1:  # shared candidates: gathered once, broadcast to every user
            rows = CandidateRows(
                rows.emb.expand(B, *rows.emb.shape),
                rows.bias.expand(B, *rows.bias.shape),
                None if rows.query is None else rows.query.expand(B, *rows.query.shape),
                None if rows.hidden is None else rows.hidden.expand(B, *rows.hidden.shape),
            )
            cand, item_dense = cand.expand(B, -1), item_dense.expand(B, -1, -1)
        rep = self.repeat(batch.hist, cand)
        if light_scores is None:
            light_scores = self.light_from(u, rows, rep, item_dense)
        return light_scores + self.residual_from(u, hist_emb, mask, rows, rep, item_dense, batch.user_dense)

    def residual(self, batch: RankBatch, u: Tensor, hist_emb: Tensor, mask: Tensor) -> Tensor:
        """The full path's correction to the light score for per-user candidates ``B x C``."""
        rows = self.candidate_rows(batch.cand)
        rep = self.repeat(batch.hist, batch.cand)
        return self.residual_from(u, hist_emb, mask, rows, rep, batch.item_dense, batch.user_dense)

    def residual_from(
        self,
        u: Tensor,
        hist_emb: Tensor,
        mask: Tensor,
        rows: CandidateRows,
        rep: Tensor,
        item_dense: Tensor,
        user_dense: Tensor,
    ) -> Tensor:
        query = rows.query if rows.query is not None else self.attention.queries(rows.emb)
        hidden = rows.hidden if rows.hidden is not None else self.mlp.item_hidden(rows.emb)
        attended = self.attention(query, hist_emb, mask)  # B x C x D
        raw = self.mlp(attended, rows.emb, hidden, item_dense, rep, torch.cat([u, user_dense], dim=1))
        bound = nn.functional.softplus(self.residual_bound)
        return bound * torch.tanh(raw / bound)

    def cascade(self, batch: RankBatch, head: Tensor) -> Tensor:
        """Light over every candidate, full over each user's light head of ``head[b]`` candidates.

        ``batch.cand``: ``B x C`` (PAD-padded); ``head``: ``B`` int64 -> ``B x C`` scores in which
        the head stays above the rest (a cascade only re-orders what the light path put first) and
        is ordered by the full path; the rest keeps the light order. One pass: the user side is
        computed once for both paths, the head picked and gathered in torch.
        """
        h = int(min(int(head.max()), batch.cand.shape[1])) if head.numel() else 0
        if h == 0:
            return self.light(batch)
        return self.cascade_top(batch, head, h)

    def cascade_top(self, batch: RankBatch, head: Tensor, h: int) -> Tensor:
        """:meth:`cascade` with the batch's largest head ``h`` (``1 <= h <= C``) given as a size.

        Every path is this one function: ``head[b] == 0`` gives request ``b`` its light scores,
        ``head[b] == C`` its full scores (on its real candidates). The compiled served graph
        (:mod:`models.aoti`) is this method with ``h`` a dynamic dimension.
        """
        u, hist_emb, mask = self.user_vector(batch.hist, batch.user_dense)
        cand, item_dense = batch.cand, batch.item_dense
        rep = self.repeat(batch.hist, cand)
        light = self.light_from(u, self.candidate_rows(cand, full=False), rep, item_dense)  # B x C
        pad = cand == 0
        top = torch.topk(light.masked_fill(pad, float("-inf")), h, dim=1).indices  # B x h
        in_head = (torch.arange(h, device=cand.device).unsqueeze(0) < head.unsqueeze(1)) & ~pad.gather(1, top)
        cand_h = cand.gather(1, top)
        item_h = item_dense.gather(1, top.unsqueeze(2).expand(-1, -1, item_dense.shape[2]))
        rows_h = self.candidate_rows(cand_h)
        res = self.residual_from(u, hist_emb, mask, rows_h, rep.gather(1, top), item_h, batch.user_dense)
        full_h = light.gather(1, top) + res  # B x h
        is_head = torch.zeros_like(pad).scatter(1, top, in_head)
        tail_max = light.masked_fill(is_head | pad, float("-inf")).amax(dim=1)
        head_min = full_h.masked_fill(~in_head, float("inf")).amin(dim=1)
        gap = (tail_max - head_min + 1e-3).clamp_min(0.0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        out = light - gap.unsqueeze(1)
        return out.scatter(1, top, torch.where(in_head, full_h, out.gather(1, top)))

    def forward(self, batch: RankBatch) -> Tensor:
        return self.full(batch)


def path_macs(config: RankerConfig, history_len: int) -> dict[str, float]:
    """Multiply-adds per candidate of each path (and per user for the user side), from the config.

    The unit of "compute per request" in the routing report: measured latencies vary with the
    machine's load, these do not.
    """
    D, L = config.embedding.dim, history_len
    A, hidden = config.full.attention_dim, config.full.mlp_hidden
    # Counted as served: per-item query and first-layer block come from the precomputed table.
    light_cand = D + 2 * config.item_dense_dim + L
    light_user = L * D + config.user_dense_dim * D
    mlp = (2 * D + config.item_dense_dim + 1) * hidden[0]
    mlp += sum(a * b for a, b in zip(hidden, hidden[1:], strict=False)) + hidden[-1]
    full_cand = L * A + L * D + D + mlp
    full_user = L * D * (A + D) + (D + config.user_dense_dim) * hidden[0]
    return {
        "light_per_candidate": float(light_cand),
        "light_per_user": float(light_user),
        "full_per_candidate": float(full_cand + light_cand),
        "full_per_user": float(full_user + light_user),
    }
