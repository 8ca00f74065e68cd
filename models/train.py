"""Training loop: both paths learned jointly, single process or under ``torchrun`` with DDP (gloo).

Each step takes ``B`` contexts (:class:`~models.data.Contexts`):

* light path: a softmax over every known item (or, for catalogues above
  ``full_softmax_max_items``, over the batch's positives plus popularity-sampled items with the
  log-Q correction), one positive at a time against all non-positives of the context;
* full path: the same catalogue-wide cross-entropy for (light + residual), with the residual
  computed only for up to ``full_positives`` positives and ``full_samples`` items drawn from the
  light path's softmax (importance sampling, see :class:`TrainStep`).

All randomness comes from a seeded numpy generator, so a run is reproducible; under DDP every
rank walks the same shuffled order, taking every ``world``-th batch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.data import TrainingData
from models.model import ItemEmbedding, RankBatch, TwoPathRanker
from models.vocab import FIRST_ITEM_ROW, ItemVocab

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    # Chosen on Online Retail's validation split (train < 2011-10-09, evaluate the next month):
    # 10 epochs of 256 at 6e-3 matched 10 of 128 at 3e-3 on the routed path (NDCG@10 0.203 vs
    # 0.204, within run-to-run noise), beat it on the light path (0.201 vs 0.195), in 35% less time.
    epochs: int = 10
    batch_size: int = 256  # contexts per step (per process under DDP)
    lr: float = 6e-3
    weight_decay: float = 1e-6
    seed: int = 0
    full_positives: int = 8  # positives per context the full path scores (a random subset)
    # Items drawn from the light softmax per context to estimate the full path's normaliser.
    full_samples: int = 64
    # Weight of the light path's distillation from the full path (see TrainStep).
    distill: float = 1.0
    # Exact softmax over the catalogue up to this many items (Online Retail: ~4k); sampled above.
    full_softmax_max_items: int = 50_000
    sampled_negatives: int = 4_096
    full_loss_weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainHistory:
    step_loss: list[float] = field(default_factory=list)  # light + full, per step (rank 0)
    step_light: list[float] = field(default_factory=list)
    step_full: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    world_size: int = 1


def multi_positive_softmax(logits: Tensor, positive: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean over contexts of the mean over their positives of ``-log softmax`` of the positive
    against the context's valid non-positives. ``logits``/``positive``/``valid``: ``B x C``."""
    blocked = positive if valid is None else positive | ~valid
    lse_neg = torch.logsumexp(logits.masked_fill(blocked, float("-inf")), dim=1, keepdim=True)
    per = nn.functional.softplus(lse_neg - logits) * positive
    n_pos = positive.sum(dim=1)
    has = n_pos > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    return (per.sum(dim=1)[has] / n_pos[has]).mean()


class TrainStep(nn.Module):
    """Loss of one batch; a module so DDP can wrap it (its forward is what DDP synchronises).

    The full path's loss is a cross-entropy over the whole candidate set, estimated by importance
    sampling: with ``q = softmax(light)``, ``Z_full = Z_light * E_{j~q}[exp(residual_j)]``, so only
    the positives and ``M`` items drawn from ``q`` need the costly residual. Training the residual
    on a short list without that anchor taught it to flatten the light scores, which a short list
    rewards and a full catalogue punishes.
    """

    def __init__(self, model: TwoPathRanker, distill: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.distill = distill

    def forward(
        self,
        hist: Tensor,  # B x L
        user_dense: Tensor,  # B x Fu
        cand_rows: Tensor,  # N shared candidates
        item_dense: Tensor,  # B x N x Fi
        log_q: Tensor,  # N sampling correction (zeros for the exact softmax)
        positive: Tensor,  # B x N bool
        full_pos: Tensor,  # B x P indices into cand_rows (-1 = none)
        uniform: Tensor,  # B x M uniform(0, 1) numbers: draws from the light softmax
    ) -> tuple[Tensor, Tensor]:
        model = self.model
        u, hist_emb, mask = model.user_vector(hist, user_dense)
        rows_all = model.candidate_rows(cand_rows, full=False)
        light = model.light_from(u, rows_all, model.repeat(hist, cand_rows), item_dense) - log_q  # B x N
        loss_light = multi_positive_softmax(light, positive)

        with torch.no_grad():
            cdf = torch.cumsum(torch.softmax(light, dim=1), dim=1)
            drawn = torch.searchsorted(cdf, uniform.contiguous()).clamp_max(light.shape[1] - 1)  # B x M
        P = full_pos.shape[1]
        idx = torch.cat([full_pos.clamp_min(0), drawn], dim=1)  # B x (P + M)
        rows_f = cand_rows[idx]
        item_f = item_dense.gather(1, idx.unsqueeze(2).expand(-1, -1, item_dense.shape[2]))
        res = model.residual(RankBatch(hist, user_dense, rows_f, item_f), u, hist_emb, mask)
        valid = full_pos >= 0
        n_pos = valid.sum(dim=1)
        has = n_pos > 0
        pos_logit = (light.gather(1, idx[:, :P]) + res[:, :P]) * valid
        log_z = (
            torch.logsumexp(light, dim=1) + torch.logsumexp(res[:, P:], dim=1) - math.log(res.shape[1] - P)
        )
        per_context = log_z - pos_logit.sum(dim=1) / n_pos.clamp_min(1)
        loss_full = per_context[has].mean() if bool(has.any()) else res.sum() * 0.0
        if self.distill > 0:
            # Teach the light path the full path's order over the drawn items: a cascade's head then
            # holds more of what the full path would have put first.
            drawn_light = light.gather(1, idx[:, P:])
            teacher = torch.softmax((drawn_light + res[:, P:]).detach(), dim=1)
            loss_light = (
                loss_light + self.distill * -(teacher * torch.log_softmax(drawn_light, dim=1)).sum(1).mean()
            )
        return loss_light, loss_full


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warmup = max(1, total // 20)
    return config.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the gloo process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def warm_start(
    model: TwoPathRanker, vocab: ItemVocab, old_state: dict[str, Tensor], old_vocab: ItemVocab
) -> int:
    """Copy a previous version's weights: item rows matched by item id, other tensors where shapes agree.
    Returns the number of item rows carried over."""
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in old_state.items():
            if name in ("items.weight", "items.bias") or name not in own:
                continue
            if own[name].shape == tensor.shape:
                own[name].copy_(tensor)
        new_rows, old_rows = [], []
        for row, item in enumerate(vocab.item_ids, FIRST_ITEM_ROW):
            old = old_vocab.row(item)
            if old >= FIRST_ITEM_ROW:
                new_rows.append(row)
                old_rows.append(old)
        for name in ("items.weight", "items.bias"):
            if name in old_state and name in own:
                own[name][:FIRST_ITEM_ROW] = old_state[name][:FIRST_ITEM_ROW]
                if new_rows:
                    own[name][torch.tensor(new_rows)] = old_state[name][torch.tensor(old_rows)]
    model.load_state_dict(own)
    return len(new_rows)


class _BatchMaker:
    """Numpy side of a step: gathers a batch's features and draws its random items."""

    def __init__(self, data: TrainingData, config: TrainConfig) -> None:
        self.data = data
        self.config = config
        V = len(data.vocab)
        self.exact = V - FIRST_ITEM_ROW <= config.full_softmax_max_items
        counts = np.bincount(data.train_item, minlength=V).astype(np.float64)[FIRST_ITEM_ROW:]
        self.sample_p = counts**0.75 / max((counts**0.75).sum(), 1e-12)  # smoothed popularity
        self.all_rows = np.arange(FIRST_ITEM_ROW, V, dtype=np.int64)

    def make(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, Tensor]:
        c, cfg = self.data.contexts, self.config
        B = len(idx)
        pos_lists = [c.positives(g) for g in idx]
        if self.exact:
            cand_rows = self.all_rows
            log_q = np.zeros(len(cand_rows), dtype=np.float32)
        else:
            sampled = (
                rng.choice(len(self.sample_p), size=cfg.sampled_negatives, p=self.sample_p) + FIRST_ITEM_ROW
            )
            cand_rows = np.unique(np.concatenate([sampled, *pos_lists]))
            q = self.sample_p[cand_rows - FIRST_ITEM_ROW] * cfg.sampled_negatives
            log_q = np.log(np.maximum(q, 1e-12)).astype(np.float32)
        N = len(cand_rows)
        positive = np.zeros((B, N), dtype=bool)
        full_pos = np.full((B, cfg.full_positives), -1, dtype=np.int64)
        for b, rows in enumerate(pos_lists):
            cols = rows - FIRST_ITEM_ROW if self.exact else np.searchsorted(cand_rows, rows)
            positive[b, cols] = True
            if len(cols) > cfg.full_positives:
                cols = rng.choice(cols, size=cfg.full_positives, replace=False)
            full_pos[b, : len(cols)] = cols
        snaps = self.data.snapshots[c.snapshot[idx]]  # B x V x Fi
        item_dense = snaps[:, cand_rows]
        return {
            "hist": torch.from_numpy(c.hist[idx]),
            "user_dense": torch.from_numpy(c.user_dense[idx]),
            "cand_rows": torch.from_numpy(cand_rows),
            "item_dense": torch.from_numpy(np.ascontiguousarray(item_dense)),
            "log_q": torch.from_numpy(log_q),
            "positive": torch.from_numpy(positive),
            "full_pos": torch.from_numpy(full_pos),
            "uniform": torch.from_numpy(rng.random((B, cfg.full_samples), dtype=np.float32)),
        }


def _check_replicas_agree(model: nn.Module) -> None:
    """DDP keeps replicas identical; verify it (one float per rank) rather than publish a diverged model."""
    with torch.no_grad():
        mine = torch.stack([p.double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"DDP replicas diverged: parameter sums {[float(g) for g in gathered]}")


def fit(
    model: TwoPathRanker,
    data: TrainingData,
    config: TrainConfig,
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``data``'s contexts. Under torchrun every rank calls this."""
    import time

    from tqdm import tqdm

    rank, world = _distributed()
    torch.manual_seed(config.seed)
    step_module: nn.Module = TrainStep(model, config.distill)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module)
        # Every rank starts from rank 0's initial weights (DDP broadcasts them on wrap).
    # Decoupled weight decay scaled by the learning rate (p *= 1 - lr * wd), betas (0.9, 0.999),
    # eps 1e-8 outside the bias-corrected square root: the update the hand-written class made.
    # torch's default weight_decay is 1e-2, so it is always passed.
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=config.weight_decay,
    )
    maker = _BatchMaker(data, config)
    n_ctx = len(data.contexts)
    per_rank = n_ctx // world
    batch_size = max(1, min(config.batch_size, per_rank))
    steps_per_epoch = max(1, per_rank // batch_size)
    total = steps_per_epoch * config.epochs
    history = TrainHistory(world_size=world)
    started = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress or rank != 0, dynamic_ncols=True)
    for epoch in range(config.epochs):
        order = np.random.default_rng([config.seed, epoch]).permutation(n_ctx)
        shard = order[rank : per_rank * world : world]
        rng = np.random.default_rng([config.seed, epoch, rank, 1])
        epoch_losses = []
        for step in range(steps_per_epoch):
            idx = shard[step * batch_size : (step + 1) * batch_size]
            batch = maker.make(idx, rng)
            loss_light, loss_full = step_module(**batch)
            loss = loss_light + config.full_loss_weight * loss_full
            optimizer.zero_grad()
            loss.backward()
            for group in optimizer.param_groups:  # the schedule sets every step's rate
                group["lr"] = learning_rate(config, len(history.step_loss), total)
            optimizer.step()
            with torch.no_grad():
                assert isinstance(model.items, ItemEmbedding)
                model.items.weight[0].zero_()  # padding row stays empty
            history.step_loss.append(float(loss.detach()))
            history.step_light.append(float(loss_light.detach()))
            history.step_full.append(float(loss_full.detach()))
            epoch_losses.append(history.step_loss[-1])
            bar.update(1)
            bar.set_postfix(
                epoch=epoch + 1,
                loss=f"{np.mean(epoch_losses[-50:]):.3f}",
                light=f"{history.step_light[-1]:.3f}",
                full=f"{history.step_full[-1]:.3f}",
            )
        history.epoch_loss.append(float(np.mean(epoch_losses)))
        if on_epoch is not None and rank == 0:
            on_epoch(epoch, history.epoch_loss[-1])
    bar.close()
    if world > 1:
        _check_replicas_agree(model)
    model.eval()
    history.seconds = time.perf_counter() - started
    return history
