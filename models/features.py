"""The features the model sees and the one numeric transform applied to them, offline and at serving.

The stream consumer keeps, per user, lifetime ``views, add_to_carts, purchases``, ``last_event_ts``
and ``recent_items`` (the 50 most recent distinct items, newest first); per item, lifetime
``views, add_to_carts, purchases`` and ``trending``. Training recomputes exactly these from the
event log (:mod:`models.data`) and both sides pass them through :func:`user_dense` and
:func:`item_dense`, so the model never sees a feature scaled two different ways.
"""

from __future__ import annotations

import numpy as np

# The stream consumer keeps this many distinct recent items per user (docs/CONTRACT.md section 4).
RECENT_ITEMS = 50
EVENT_TYPE_INDEX = {"view": 0, "add_to_cart": 1, "purchase": 2}
# ``trending`` is a time-decayed weighted event count, updated on each event of the item as
#   trending <- trending * 2 ** (-(ts - last_ts) / half_life) + weight[event_type]
# with the event's own timestamp as the clock, kept as of the item's newest event (the value the
# stream consumer stores and the server passes on undecayed). Offline features recompute it the
# same way; half-life and weights equal the stream consumer's defaults (feature_store.values:
# 6 h; view 1, cart 3, purchase 5), and config.json records them with each model version.
TRENDING_HALF_LIFE_S = 6 * 3600.0
TRENDING_WEIGHTS = {"view": 1.0, "add_to_cart": 3.0, "purchase": 5.0}

USER_DENSE_DIM = 5  # log1p views, carts, purchases; log1p hours since the last event; "no last event"
ITEM_DENSE_DIM = 4  # log1p views, carts, purchases, trending


def user_dense(counts: np.ndarray, seconds_since_last: np.ndarray) -> np.ndarray:
    """Raw user features -> model inputs.

    Args:
        counts: ``N x 3`` lifetime views, add_to_carts, purchases (any real dtype; negatives clip to 0).
        seconds_since_last: ``N`` seconds since the user's newest event; NaN where the user has none.
    Returns:
        ``N x USER_DENSE_DIM`` float32.
    """
    counts = np.asarray(counts, dtype=np.float32).reshape(-1, 3)
    since = np.asarray(seconds_since_last, dtype=np.float32).reshape(-1)
    missing = np.isnan(since)
    hours = np.where(missing, 0.0, np.clip(since, 0.0, None) / 3600.0)
    out = np.empty((counts.shape[0], USER_DENSE_DIM), dtype=np.float32)
    np.log1p(np.clip(counts, 0.0, None), out=out[:, :3])
    out[:, 3] = np.log1p(hours)
    out[:, 4] = missing
    return out


def item_dense(stats: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Raw item features (``N x 4``: views, add_to_carts, purchases, trending) -> ``N x ITEM_DENSE_DIM``
    float32 model inputs. Unknown items come as zeros and stay zeros.

    ``out`` (float32, ``... x 4``, may be ``stats`` itself): transform into it, in place."""
    if out is not None:
        np.maximum(stats, 0.0, out=out)
        return np.log1p(out, out=out)
    stats = np.asarray(stats, dtype=np.float32).reshape(-1, ITEM_DENSE_DIM)
    return np.log1p(np.clip(stats, 0.0, None))
