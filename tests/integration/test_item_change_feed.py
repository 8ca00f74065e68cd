"""The item change feed on a real Redis: what a reader sees after it, and a gap when it fell behind."""

from __future__ import annotations

import pytest

from feature_store.changes import ITEM_CHANGES_KEY, announce_items, latest_id, read_item_changes

pytestmark = pytest.mark.integration


def test_a_reader_sees_what_was_announced_after_it_and_a_gap_when_its_entry_is_gone(redis_client):
    start = latest_id(redis_client)
    assert start == b"0-0"
    announce_items(redis_client, ["a", "b"])
    first = read_item_changes(redis_client, start)
    assert first.item_ids == {"a", "b"} and not first.gap
    announce_items(redis_client, ["c"])
    announce_items(redis_client, ["d"])
    second = read_item_changes(redis_client, first.last_id)
    assert second.item_ids == {"c", "d"} and not second.gap
    assert read_item_changes(redis_client, second.last_id).item_ids == set()

    # The entry read last is trimmed away (the reader fell behind the cap): a gap, and the next
    # read continues from the newest entry.
    announce_items(redis_client, ["e"])
    redis_client.xtrim(ITEM_CHANGES_KEY, maxlen=0, approximate=False)
    announce_items(redis_client, ["f"])
    gap = read_item_changes(redis_client, second.last_id)
    assert gap.gap and gap.item_ids == set()
    announce_items(redis_client, ["g"])
    after = read_item_changes(redis_client, gap.last_id)
    assert after.item_ids == {"g"} and not after.gap

    # Redis lost its data (the stream is gone): a gap too.
    redis_client.delete(ITEM_CHANGES_KEY)
    assert read_item_changes(redis_client, after.last_id).gap
