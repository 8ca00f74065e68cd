"""The feature constants that training and serving must share: one definition, read by both.

The stream side (:mod:`services.stream.aggregate`, :mod:`feature_store.values`, the merge scripts
through :class:`feature_store.writes.FeatureWriter`) and the training side (:mod:`models.data`,
:mod:`models.model`) read these names from this module, as module attributes at the time they
compute, so the two can never hold different values; ``tests/unit/test_feature_parity.py``
computes the features of one event sequence both ways and checks they agree, with these values
and with changed ones. Plain Python, no imports: training and serving both load it for free.
``docs/FEATURES.md`` explains each feature.
"""

from __future__ import annotations

# Caps of the user's lists (newest first): recent items (the model's history length too),
# purchased items, and the top categories by weight.
RECENT_ITEMS_MAX = 50
PURCHASED_ITEMS_MAX = 100
TOP_CATEGORIES_MAX = 16
# Weight of one event in an item's ``trending`` and in the user's category weights.
EVENT_WEIGHTS: dict[str, int] = {"view": 1, "add_to_cart": 3, "purchase": 5}
# Half-life of ``trending``, in event time. The consumer's --trending-half-life-s overrides it; a
# reader decaying ``trending`` to "now" (ItemFeatures.trending_at) should use the same value, and
# training recomputes ``trending`` with it (models/retrain.py records it with each model version).
TRENDING_HALF_LIFE_S = 6 * 3600.0
