"""Training and serving agree through the real online store: the stream's batches written by
:class:`feature_store.writes.FeatureWriter` (the merge script of ``feature_store/lua``) into real
Redis and read back with :func:`feature_store.reads.read_features` equal what
:func:`models.data.build` computes from the same events (``tests/unit/test_feature_parity.py``
checks the same in pure Python, and that both follow ``feature_store.spec``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

# The event sequence, the training side and the comparison are the unit test's own (one copy).
_UNIT = Path(__file__).resolve().parents[1] / "unit" / "test_feature_parity.py"
_spec = importlib.util.spec_from_file_location("feature_parity_unit", _UNIT)
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)


def test_the_online_store_holds_what_training_computes(redis_client):
    from feature_store.reads import read_features
    from feature_store.writes import BatchGuard, FeatureWriter
    from services.stream.aggregate import aggregate
    from services.stream.config import StreamConfig

    df = parity.event_sequence()
    half_life_s = StreamConfig().trending_half_life_s
    writer = FeatureWriter(redis_client, half_life_s)
    evs = parity.as_events(df)
    batch = 256
    for n, start in enumerate(range(0, len(evs), batch)):
        users, items = aggregate(evs[start : start + batch], half_life_s * 1000.0)
        guard = BatchGuard(offsets_key=b"test:applied", expected={0: n - 1}, applied={0: n})
        result = writer.apply(users, items, guard, writer.read(list(users)))
        assert result.ok, result
    user_ids = sorted(df["user_id"].unique())
    item_ids = sorted(df["item_id"].unique())
    users_read, items_read = read_features(redis_client, user_ids, item_ids)
    built, until = parity.training_features(df)
    parity.assert_agree(
        built,
        until,
        dict(zip(user_ids, users_read, strict=True)),
        dict(zip(item_ids, items_read, strict=True)),
    )
