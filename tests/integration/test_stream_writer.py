"""The merge script's guards against real Redis: a refused batch writes nothing at all."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

OFFSETS = b"test:applied"


def _snapshot(client) -> dict:
    return {key: (client.type(key), client.dump(key)) for key in client.scan_iter()}


@pytest.fixture
def writer(redis_client):
    from feature_store.writes import FeatureWriter

    return FeatureWriter(redis_client, half_life_s=3600)


def _batch(n: int = 3):
    from feature_store.values import ItemDelta, UserDelta

    users = {f"u{k}": UserDelta(views=1, last_event_ts=100 + k, recent_items=[f"i{k}"]) for k in range(n)}
    items = {f"i{k}": ItemDelta(views=1, trending=1.0, last_event_ts=100 + k) for k in range(n)}
    return users, items


def _guard(expected: int, applied: int, ids: list[str]):
    from feature_store.writes import BatchGuard

    return BatchGuard(
        offsets_key=OFFSETS,
        expected={0: expected},
        applied={0: applied},
        seen_keys=[f"test:eid:{i}".encode() for i in ids],
        seen_values=[f"t:0:{n}".encode() for n, _ in enumerate(ids)],
        seen_ttl_s=600,
    )


def test_a_batch_applies_sets_offsets_and_dedup_keys_with_their_ttl(writer, redis_client):
    from feature_store.reads import read_features

    users, items = _batch()
    result = writer.apply(users, items, _guard(-1, 2, ["a", "b", "c"]), writer.read(list(users)))
    assert result.ok
    assert redis_client.hget(OFFSETS, "0") == b"2"
    assert redis_client.get("test:eid:b") == b"t:0:1"
    assert 590 <= redis_client.ttl("test:eid:b") <= 600
    got_users, got_items = read_features(redis_client, list(users), list(items))
    assert [u.views for u in got_users] == [1, 1, 1]
    assert [i.views for i in got_items] == [1, 1, 1]


def test_a_moved_fence_refuses_the_batch(writer, redis_client):
    users, items = _batch()
    redis_client.hset(OFFSETS, "0", 7)
    before = _snapshot(redis_client)
    result = writer.apply(users, items, _guard(5, 9, ["a"]), writer.read(list(users)))
    assert not result.ok and (result.fenced_partition, result.stored_offset) == (0, 7)
    assert _snapshot(redis_client) == before


def test_a_seen_event_id_refuses_the_batch_and_sets_no_other_key(writer, redis_client):
    users, items = _batch()
    redis_client.set("test:eid:b", "earlier")
    before = _snapshot(redis_client)
    result = writer.apply(users, items, _guard(-1, 2, ["a", "b", "c"]), writer.read(list(users)))
    assert not result.ok and result.seen_duplicates == [1]
    assert _snapshot(redis_client) == before  # "a" and "c" were set, then taken back


def test_a_user_written_since_the_read_refuses_the_batch(writer, redis_client):
    from feature_store.reads import read_features
    from feature_store.values import UserDelta, UserFeatures
    from feature_store.writes import BatchGuard, write_features

    users, items = _batch(1)
    state = writer.read(list(users))
    write_features(redis_client, users={"u0": UserFeatures(views=5)})  # someone else writes u0
    before = _snapshot(redis_client)
    result = writer.apply(users, items, _guard(-1, 0, []), state)
    assert not result.ok and result.stale_users == ["u0"]
    assert _snapshot(redis_client) == before
    # read again: the merge now builds on what the other writer left
    assert writer.apply(users, items, _guard(-1, 0, []), writer.read(list(users))).ok
    assert read_features(redis_client, ["u0"], [])[0][0].views == 6
    # the writer remembers u0 as it wrote it: the next batch needs no read, and is still checked
    more = {"u0": UserDelta(views=1, last_event_ts=1)}
    assert writer.read(list(more)).users == {}
    guard = BatchGuard(offsets_key=OFFSETS, expected={0: 0}, applied={0: 1})
    assert writer.apply(more, {}, guard, writer.read(list(more))).ok
    assert read_features(redis_client, ["u0"], [])[0][0].views == 7
