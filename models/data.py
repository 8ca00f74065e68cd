"""Training and evaluation data from an event log, with features exactly as the stream serves them.

The log is split by time: training sees only events strictly before ``until``. A training
*context* is one user at one instant (all of the user's events sharing a timestamp, e.g. the lines
of one invoice); its features are computed from events strictly before that instant only, and
its positives are the distinct items of those events. The evaluation set is, per user, the first
instant at or after ``until`` (the user's next interaction after the cut), with the user's
features at the cut; guests (Online Retail rows without a customer, ``guest-<invoice>``) are not
evaluated because they never return.

Item counters come from snapshots taken every ``bucket`` of time (each built from the events
strictly before the snapshot's time), so a context sees counters at most one bucket stale and
never from its own instant or later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from feature_store import spec
from models.features import EVENT_TYPE_INDEX, ITEM_DENSE_DIM, item_dense, user_dense
from models.vocab import OOV, PAD, ItemVocab
from recstack.errors import UserError
from recstack.events import InvalidEvent, parse_timestamp

log = logging.getLogger(__name__)

GUEST_PREFIX = "guest-"  # recstack.sources maps Online Retail rows without a customer to guest-<invoice>
# Item-counter snapshots: at least an hour apart, at most this many (memory: S x V x 4 floats).
MIN_BUCKET_MS = 3_600_000
MAX_SNAPSHOT_FLOATS = 10_000_000


def parse_until(text: str, flag: str = "--until") -> int:
    """RFC 3339 -> epoch ms, or a :class:`UserError` naming the flag."""
    try:
        return parse_timestamp(text, field=flag)
    except InvalidEvent as exc:
        raise UserError(f"{flag}: {exc.reason}") from None


def ms_to_rfc3339(ms: int) -> str:
    return pd.Timestamp(ms, unit="ms", tz="UTC").isoformat().replace("+00:00", "Z")


@dataclass
class Contexts:
    """``G`` user instants. ``hist``: ``G x L`` rows newest first (PAD-padded); ``user_dense``: ``G x Fu``;
    ``snapshot``: ``G`` index into :attr:`TrainingData.snapshots`; positives of context ``g`` are
    ``pos_rows[pos_ptr[g]:pos_ptr[g+1]]``."""

    hist: np.ndarray
    user_dense: np.ndarray
    snapshot: np.ndarray
    pos_ptr: np.ndarray
    pos_rows: np.ndarray
    ts: np.ndarray
    user: np.ndarray  # int user codes (index into TrainingData.user_ids)

    def __len__(self) -> int:
        return len(self.ts)

    def positives(self, g: int) -> np.ndarray:
        return self.pos_rows[self.pos_ptr[g] : self.pos_ptr[g + 1]]


@dataclass
class EvalSet:
    """Per evaluated user: features at the cut and the items of their next instant after it.

    ``item_dense``: ``V x Fi`` counters of every row at the cut (the same for all users).
    """

    hist: np.ndarray
    user_dense: np.ndarray
    target_ptr: np.ndarray
    target_rows: np.ndarray
    user: np.ndarray
    item_dense: np.ndarray
    dropped_unknown_only: int = 0  # users whose next items were all unknown to training (unrankable)

    def __len__(self) -> int:
        return len(self.user)

    def targets(self, k: int) -> np.ndarray:
        return self.target_rows[self.target_ptr[k] : self.target_ptr[k + 1]]

    @property
    def cold(self) -> np.ndarray:
        return (self.hist == PAD).all(axis=1)


@dataclass
class TrainingData:
    vocab: ItemVocab
    contexts: Contexts
    snapshots: np.ndarray  # S x V x Fi transformed item counters
    catalogue_stats: np.ndarray  # V x 4 raw counters at the cut (candidate generation at serving)
    eval: EvalSet | None
    user_ids: np.ndarray  # user code -> user id
    # Training interactions (one per distinct user instant x item) for the baselines.
    train_user: np.ndarray
    train_item: np.ndarray
    # All events before the cut, per user in time order, for baselines needing more than 50 items.
    summary: dict = field(default_factory=dict)


def dedup_events(events: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop repeated event ids (the first one counts, as in the stream) -> (events, number dropped)."""
    keep = ~events["event_id"].duplicated(keep="first")
    dropped = int((~keep).sum())
    return events[keep].reset_index(drop=True), dropped


def build(
    events: pd.DataFrame,
    until_ms: int,
    eval_until_ms: int | None = None,
    min_item_count: int = 2,
    history_len: int | None = None,
    vocab: ItemVocab | None = None,
) -> TrainingData:
    """Events (any order, duplicates allowed) -> training contexts before ``until_ms`` and the
    evaluation set in ``[until_ms, eval_until_ms)``. ``vocab``: a trained model's vocabulary
    (evaluating a saved version); by default built from the training events. ``history_len``:
    recent items per user, by default what the stream keeps (:mod:`feature_store.spec`)."""
    if history_len is None:
        history_len = spec.RECENT_ITEMS_MAX
    events, duplicates = dedup_events(events)
    events = events.sort_values("ts", kind="stable").reset_index(drop=True)
    unknown_types = set(events["event_type"].unique()) - set(EVENT_TYPE_INDEX)
    if unknown_types:
        raise UserError(f"event log has unknown event_type(s): {', '.join(map(str, sorted(unknown_types)))}")
    train = events[events["ts"].to_numpy() < until_ms]
    later = events[events["ts"].to_numpy() >= until_ms]
    if eval_until_ms is not None:
        later = later[later["ts"].to_numpy() < eval_until_ms]
    if train.empty:
        raise UserError(f"--until: no events before {ms_to_rfc3339(until_ms)} to train on")

    counts = train["item_id"].value_counts()
    # Stable order: most frequent first, ties by id, so the same log gives the same rows.
    if vocab is None:
        frequent = counts[counts >= min_item_count]
        vocab = ItemVocab(sorted(frequent.index, key=lambda i: (-int(frequent[i]), str(i))))
    V = len(vocab)

    item_rows = vocab.rows(train["item_id"].to_numpy())
    types = train["event_type"].map(EVENT_TYPE_INDEX).to_numpy().astype(np.int64)
    ts = train["ts"].to_numpy().astype(np.int64)
    user_codes, user_ids = pd.factorize(train["user_id"], sort=False)
    user_ids = np.asarray(user_ids, dtype=object)

    snapshots, bucket_ms, t0, catalogue = _item_snapshots(item_rows, types, ts, V, until_ms)
    contexts, final_state = _user_contexts(
        user_codes, item_rows, types, ts, history_len, t0, bucket_ms, len(user_ids)
    )
    eval_set = None
    if not later.empty:
        eval_set = _eval_set(later, user_ids, final_state, vocab, history_len, item_dense(catalogue))

    summary = {
        "events_given": int(len(events) + duplicates),
        "duplicate_event_ids": duplicates,
        "train_events": int(len(train)),
        "train_first_ts": ms_to_rfc3339(int(ts[0])),
        "train_last_ts": ms_to_rfc3339(int(ts[-1])),
        "until": ms_to_rfc3339(until_ms),
        "eval_events": int(len(later)),
        "users": int(len(user_ids)),
        "items_in_vocab": len(vocab.item_ids),
        "items_seen": int(len(counts)),
        "min_item_count": min_item_count,
        "contexts": len(contexts),
        "snapshot_bucket_hours": bucket_ms / 3_600_000,
        "eval_users": 0 if eval_set is None else len(eval_set),
        "eval_users_cold": 0 if eval_set is None else int(eval_set.cold.sum()),
        "eval_users_dropped_unknown_items": 0 if eval_set is None else eval_set.dropped_unknown_only,
    }
    # Distinct (instant, user, item) interactions: what the baselines learn from.
    keys = pd.DataFrame({"u": user_codes, "t": ts, "i": item_rows}).drop_duplicates()
    return TrainingData(
        vocab=vocab,
        contexts=contexts,
        snapshots=snapshots,
        catalogue_stats=catalogue,
        eval=eval_set,
        user_ids=user_ids,
        train_user=keys["u"].to_numpy(np.int64),
        train_item=keys["i"].to_numpy(np.int64),
        summary=summary,
    )


def _item_snapshots(
    rows: np.ndarray, types: np.ndarray, ts: np.ndarray, V: int, until_ms: int
) -> tuple[np.ndarray, int, int, np.ndarray]:
    """Item counters (views, carts, purchases, trending) replayed in time order, snapshotted at
    ``t0 + k * bucket`` (from events strictly before that time) -> (``S x V x Fi`` transformed,
    bucket, t0, ``V x 4`` raw counters at the cut)."""
    t0 = int(ts[0])
    span = max(int(ts[-1]) - t0 + 1, 1)
    max_snaps = max(2, MAX_SNAPSHOT_FLOATS // (V * ITEM_DENSE_DIM))
    bucket = max(MIN_BUCKET_MS, -(-span // max_snaps))
    n_snaps = span // bucket + 1
    by_index = sorted(EVENT_TYPE_INDEX, key=lambda t: EVENT_TYPE_INDEX[t])
    # the stream's own weights and half-life (feature_store.spec), read per call
    weights = np.asarray([float(spec.EVENT_WEIGHTS[t]) for t in by_index])
    half_life_ms = spec.TRENDING_HALF_LIFE_S * 1000.0
    # One snapshot per bucket boundary: boundary k covers events with ts < t0 + k * bucket.
    boundary_of_event = (ts - t0) // bucket + 1  # first boundary that includes the event
    counts = np.zeros((V, 3), dtype=np.float64)
    trend = np.zeros(V, dtype=np.float64)
    last = np.zeros(V, dtype=np.float64)
    snaps = np.zeros((n_snaps, V, ITEM_DENSE_DIM), dtype=np.float32)
    cuts = np.searchsorted(boundary_of_event, np.arange(n_snaps + 1), side="left")
    for k in range(n_snaps):
        lo, hi = cuts[k], cuts[k + 1]
        if hi > lo:
            _apply(rows[lo:hi], types[lo:hi], ts[lo:hi], counts, trend, last, weights, half_life_ms)
        if k:  # snapshot 0 (events before the first one) stays zeros
            snaps[k] = item_dense(np.concatenate([counts, trend[:, None]], axis=1))
    if cuts[n_snaps] < len(rows):
        _apply(
            rows[cuts[n_snaps] :],
            types[cuts[n_snaps] :],
            ts[cuts[n_snaps] :],
            counts,
            trend,
            last,
            weights,
            half_life_ms,
        )
    catalogue = np.concatenate([counts, trend[:, None]], axis=1).astype(np.float32)
    catalogue[PAD] = 0.0
    snaps[:, PAD] = 0.0
    return snaps, int(bucket), t0, catalogue


def _apply(rows, types, ts, counts, trend, last, weights, half_life_ms) -> None:
    """Fold a time-ordered run of events into the item counters (vectorised per distinct item)."""
    np.add.at(counts, (rows, types), 1.0)
    # Trending, event by event within the run. Runs are one bucket, so a Python loop over the few
    # events per item is fine; items of a run are handled together where they have one event.
    for r, t, w in zip(rows.tolist(), ts.tolist(), weights[types].tolist(), strict=True):
        trend[r] = trend[r] * 2.0 ** (-(t - last[r]) / half_life_ms) + w
        last[r] = t


@dataclass
class _UserState:
    recent: dict  # item row -> None, oldest first (dict order), newest last
    counts: np.ndarray  # 3
    last_ts: int | None


def _recent_rows(recent: dict, L: int) -> list[int]:
    out = []
    for r in reversed(recent):
        out.append(r)
        if len(out) == L:
            break
    return out


def _user_contexts(
    users: np.ndarray,
    rows: np.ndarray,
    types: np.ndarray,
    ts: np.ndarray,
    L: int,
    t0: int,
    bucket: int,
    n_users: int,
) -> tuple[Contexts, list[_UserState]]:
    """One context per (user, instant), features from the user's strictly earlier events."""
    order = np.lexsort((np.arange(len(ts)), ts, users))  # by user, then time, then arrival
    u_sorted, t_sorted = users[order], ts[order]
    starts = np.flatnonzero(np.r_[True, (u_sorted[1:] != u_sorted[:-1]) | (t_sorted[1:] != t_sorted[:-1])])
    ends = np.r_[starts[1:], len(order)]
    G = len(starts)
    hist = np.zeros((G, L), dtype=np.int64)
    counts_before = np.zeros((G, 3), dtype=np.float32)
    since = np.full(G, np.nan, dtype=np.float32)
    pos_ptr = np.zeros(G + 1, dtype=np.int64)
    pos_chunks: list[np.ndarray] = []
    states: list[_UserState] = [_UserState({}, np.zeros(3), None) for _ in range(n_users)]
    rows_sorted, types_sorted = rows[order], types[order]
    for g in range(G):
        lo, hi = starts[g], ends[g]
        st = states[u_sorted[lo]]
        t = int(t_sorted[lo])
        recent = _recent_rows(st.recent, L)
        hist[g, : len(recent)] = recent
        counts_before[g] = st.counts
        if st.last_ts is not None:
            since[g] = (t - st.last_ts) / 1000.0
        group_rows = rows_sorted[lo:hi]
        positives = np.unique(group_rows[group_rows != OOV])
        pos_chunks.append(positives)
        pos_ptr[g + 1] = pos_ptr[g] + len(positives)
        for r in group_rows.tolist():  # arrival order: the last one is the newest
            st.recent.pop(r, None)
            st.recent[r] = None
        np.add.at(st.counts, types_sorted[lo:hi], 1.0)
        st.last_ts = t
        if len(st.recent) > 4 * L:  # only the newest L matter; keep the dict small
            st.recent = dict.fromkeys(list(st.recent)[-L:])
    ctx_ts = t_sorted[starts].astype(np.int64)
    snapshot = ((ctx_ts - t0) // bucket).astype(np.int64)  # boundary <= ts: strictly earlier events
    contexts = Contexts(
        hist=hist,
        user_dense=user_dense(counts_before, since),
        snapshot=snapshot,
        pos_ptr=pos_ptr,
        pos_rows=np.concatenate(pos_chunks) if pos_chunks else np.zeros(0, np.int64),
        ts=ctx_ts,
        user=u_sorted[starts].astype(np.int64),
    )
    # Training order = time order (shuffled per epoch later); keeps the set reproducible.
    return _sort_contexts(contexts), states


def _sort_contexts(c: Contexts) -> Contexts:
    order = np.lexsort((c.user, c.ts))
    sizes = np.diff(c.pos_ptr)[order]
    ptr = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(sizes, out=ptr[1:])
    rows = (
        np.concatenate([c.pos_rows[c.pos_ptr[g] : c.pos_ptr[g + 1]] for g in order])
        if len(order)
        else c.pos_rows
    )
    return Contexts(
        c.hist[order], c.user_dense[order], c.snapshot[order], ptr, rows, c.ts[order], c.user[order]
    )


def _eval_set(
    later: pd.DataFrame,
    user_ids: np.ndarray,
    states: list[_UserState],
    vocab: ItemVocab,
    L: int,
    item_dense_at_cut: np.ndarray,
) -> EvalSet:
    later = later[~later["user_id"].astype(str).str.startswith(GUEST_PREFIX)]
    first_ts = later.groupby("user_id", sort=False)["ts"].transform("min")
    nxt = later[later["ts"] == first_ts]
    code_of = {u: k for k, u in enumerate(user_ids)}
    hist_rows, dense_counts, since, targets, users = [], [], [], [], []
    dropped = 0
    for user, group in nxt.groupby("user_id", sort=True):
        rows = np.unique(vocab.rows(group["item_id"].to_numpy()))
        rows = rows[rows != OOV]
        if len(rows) == 0:
            dropped += 1
            continue
        code = code_of.get(user)
        st = states[code] if code is not None else None
        t = int(group["ts"].iloc[0])
        hist_rows.append(_recent_rows(st.recent, L) if st else [])
        dense_counts.append(st.counts if st else np.zeros(3))
        since.append((t - st.last_ts) / 1000.0 if st and st.last_ts is not None else np.nan)
        targets.append(rows)
        users.append(user)
    hist = np.zeros((len(users), L), dtype=np.int64)
    for k, h in enumerate(hist_rows):
        hist[k, : len(h)] = h
    ptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in targets], out=ptr[1:])
    return EvalSet(
        hist=hist,
        user_dense=user_dense(
            np.asarray(dense_counts, dtype=np.float32).reshape(-1, 3), np.asarray(since, np.float32)
        ),
        target_ptr=ptr,
        target_rows=np.concatenate(targets) if targets else np.zeros(0, np.int64),
        user=np.asarray(users, dtype=object),
        item_dense=item_dense_at_cut,
        dropped_unknown_only=dropped,
    )


def describe_span(data: TrainingData) -> str:
    s = data.summary
    return f"{s['train_events']} events {s['train_first_ts']} .. {s['train_last_ts']} (until {s['until']})"
