"""Tunable constants of the features, importable without Feast (Feast takes seconds to import).

:mod:`feature_store.online` re-exports them; ``docs/FEATURES.md`` explains each.
"""

RECENT_ITEMS_MAX = 50
PURCHASED_ITEMS_MAX = 100
TOP_CATEGORIES_MAX = 16
# Weight of one event in ``trending`` and in the user's category weights.
EVENT_WEIGHTS: dict[str, int] = {"view": 1, "add_to_cart": 3, "purchase": 5}
# Half-life of ``trending``, in event time. The consumer's --trending-half-life-s overrides it; a
# reader decaying ``trending`` to "now" (ItemFeatures.trending_at) should use the same value.
DEFAULT_TRENDING_HALF_LIFE_S = 6 * 3600.0
