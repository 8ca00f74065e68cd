"""The popularity baseline, published and served as a model version of its own.

An experiment's control arm is often "what a shop does without a model": the most popular items,
the same for everyone. Publishing it as a version (``recstack publish-baseline popularity``) lets
the ranking server load, verify and hot-reload it through the very path a trained version takes,
and lets an experiment name it like any other version.

A popularity version is a folder like a trained one (:mod:`models.artifacts`), without weights:

* ``config.json``: ``kind: "popularity"``, the artifact format, the event weights and the window;
* ``vocab.json``: every item seen, most popular first (ties by id);
* ``catalogue.npz``: ``popularity`` (one score per row: the item's events weighted by intent,
  ``view`` 1, ``add_to_cart`` 3, ``purchase`` 5, the stream's own weights), ``item_stats``
  (views, add_to_carts, purchases, 0) and ``recommendable``, one row per vocabulary row as in a
  trained version (rows 0 and 1, padding and unknown, are zero);
* ``MANIFEST.sha256``: every other file's checksum, checked before anything is read.

Scores are frozen at publication, as a trained version's are: a replay of the same log ranks the
same way, and the baseline is the offline one (:func:`models.baselines.popularity`) weighted by
intent. Publish it again (on the retraining schedule, say) to refresh it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models import artifacts
from models.inference import RankInput, RankOutput
from models.vocab import FIRST_ITEM_ROW, ItemVocab
from recstack.errors import UserError

KIND = "popularity"
REQUIRED = (artifacts.CONFIG, artifacts.VOCAB, artifacts.CATALOGUE)
# The path a response reports: popularity is one cheap lookup per candidate, the light path's
# place in the server's metrics; the model version says which ranker answered.
PATH = "light"


def event_weights() -> dict[str, float]:
    """Intent weights of the event types: the stream's own (``feature_store.spec``)."""
    from feature_store import spec

    return {kind: float(w) for kind, w in spec.EVENT_WEIGHTS.items()}


def popularity_table(events: pd.DataFrame, weights: Mapping[str, float]) -> pd.DataFrame:
    """Per item: ``views``, ``add_to_carts``, ``purchases`` and the weighted ``popularity``, most
    popular first (ties by item id, so the same log gives the same order)."""
    from models.data import dedup_events

    events, _ = dedup_events(events)
    unknown = set(events["event_type"].unique()) - set(weights)
    if unknown:
        raise UserError(f"event log has unknown event_type(s): {', '.join(map(str, sorted(unknown)))}")
    counts = pd.crosstab(events["item_id"].astype(str), events["event_type"])
    counts = counts.reindex(columns=["view", "add_to_cart", "purchase"], fill_value=0)
    table = pd.DataFrame(
        {
            "views": counts["view"].astype(np.float64),
            "add_to_carts": counts["add_to_cart"].astype(np.float64),
            "purchases": counts["purchase"].astype(np.float64),
        }
    )
    table["popularity"] = sum(counts[k] * float(weights[k]) for k in ("view", "add_to_cart", "purchase"))
    table = table.rename_axis("item_id").reset_index()
    return table.sort_values(["popularity", "item_id"], ascending=[False, True], kind="stable").reset_index(
        drop=True
    )


def publish_popularity(
    models_dir: str | Path,
    events: pd.DataFrame,
    *,
    until_ms: int | None = None,
    sources: Sequence[str] = (),
    version: str | None = None,
) -> Path:
    """Count ``events`` (strictly before ``until_ms`` when given) and publish the popularity
    version into ``models_dir`` (atomically: a ``.tmp-`` folder renamed into place). Returns it."""
    from models.data import ms_to_rfc3339

    if until_ms is not None:
        events = events[events["ts"].to_numpy() < until_ms]
    if events.empty:
        raise UserError("--from: no events to count" + (" before --until" if until_ms is not None else ""))
    weights = event_weights()
    table = popularity_table(events, weights)
    vocab = ItemVocab(table["item_id"].tolist())
    pad = np.zeros(FIRST_ITEM_ROW)
    popularity = np.concatenate([pad, table["popularity"].to_numpy()]).astype(np.float32)
    stats = np.zeros((len(vocab), 4), dtype=np.float32)
    stats[FIRST_ITEM_ROW:, :3] = table[["views", "add_to_carts", "purchases"]].to_numpy()
    config: dict[str, Any] = {
        "format_version": artifacts.FORMAT_VERSION,
        "kind": KIND,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "events": list(sources),
        "event_weights": weights,
        "data": {
            "events": int(len(events)),
            "items": len(vocab.item_ids),
            "first_ts": ms_to_rfc3339(int(events["ts"].min())),
            "last_ts": ms_to_rfc3339(int(events["ts"].max())),
            "until": None if until_ms is None else ms_to_rfc3339(until_ms),
        },
    }

    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / (version or artifacts.new_version_name())
    base, suffix = final.name, 0
    while final.exists():
        suffix += 1
        final = root / f"{base}-{suffix}"
    config["version"] = final.name
    tmp = root / f"{artifacts.TMP_PREFIX}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / artifacts.VOCAB).write_text(json.dumps(vocab.item_ids))
        np.savez(
            tmp / artifacts.CATALOGUE,
            popularity=popularity,
            item_stats=stats,
            recommendable=vocab.recommendable_rows(),
        )
        (tmp / artifacts.CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        artifacts.write_manifest(tmp)
        artifacts._fsync_dir(tmp)
        os.rename(tmp, final)
        artifacts._fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_popularity(version_dir: str | Path) -> PopularityRanker:
    """Verify the manifest and load a popularity version, or raise :class:`ArtifactError`."""
    folder = Path(version_dir)
    artifacts.verify_manifest(folder, required=REQUIRED)
    config = artifacts.read_config(folder)
    if config.get("kind") != KIND:
        raise artifacts.ArtifactError(f"{folder}: not a popularity version (kind {config.get('kind')!r})")
    try:
        item_ids = [str(i) for i in json.loads((folder / artifacts.VOCAB).read_text())]
        with np.load(folder / artifacts.CATALOGUE, allow_pickle=False) as data:
            popularity = np.asarray(data["popularity"], dtype=np.float32)
            stored = np.asarray(data["recommendable"])
        vocab = ItemVocab(item_ids, artifacts._recommendable(folder, item_ids, stored))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise artifacts.ArtifactError(f"{folder}: cannot read vocabulary or catalogue: {exc}") from None
    if popularity.shape != (len(vocab),) or not np.isfinite(popularity).all():
        raise artifacts.ArtifactError(
            f"{folder}: {artifacts.CATALOGUE}: popularity must be {len(vocab)} finite numbers "
            f"(one per row), got {popularity.dtype} {popularity.shape}"
        )
    return PopularityRanker(vocab, popularity, config, version=folder.name)


class PopularityRanker:
    """Serves a popularity version through the interface of :class:`models.inference.Ranker`:
    a candidate's score is its item's popularity (0 for an item the version never saw; ties keep
    the request's order), whoever asks. Read-only, so thread-safe."""

    form = KIND
    quantized = False

    def __init__(
        self, vocab: ItemVocab, popularity: np.ndarray, config: dict[str, Any], version: str
    ) -> None:
        self.vocab = vocab
        self.config = config
        self.version = version
        self._score = np.asarray(popularity, dtype=np.float32).copy()
        self._score[:FIRST_ITEM_ROW] = 0.0  # padding and unknown items
        rows = np.flatnonzero(vocab.recommendable_rows())
        # Recommend's candidates: recommendable items, most popular first (stable: vocabulary order).
        order = rows[np.argsort(-self._score[rows], kind="stable")]
        self._ranked = [vocab.item_ids[int(r) - FIRST_ITEM_ROW] for r in order]

    def rank_batch(
        self, inputs: list[RankInput], load: float = 0.0, force_path: str | None = None
    ) -> list[RankOutput]:
        rows = self.vocab.rows
        return [RankOutput(scores=self._score[rows(inp.candidates)], path=PATH) for inp in inputs]

    def candidates(self, recent_items: Sequence[str], k: int, exclude: set[str] | None = None) -> list[str]:
        """The ``k`` most popular recommendable items, minus ``exclude`` (what the user bought)."""
        if k <= 0:
            return []
        if not exclude:
            return list(self._ranked[:k])
        out: list[str] = []
        for item in self._ranked:
            if item not in exclude:
                out.append(item)
                if len(out) == k:
                    break
        return out

    def warmup(self) -> None:
        """Nothing to compile or trace; one call checks the lookups work."""
        head = self._ranked[:10]
        self.rank_batch([RankInput((), (0.0, 0.0, 0.0), None, head, np.zeros((len(head), 4), np.float32))])
