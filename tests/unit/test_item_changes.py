"""The item change feed's writer side without Redis: an announcement is best effort."""

from __future__ import annotations

import logging

import redis

from feature_store.changes import ITEM_CHANGES_KEY, announce_items


class Client:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[tuple] = []

    def xadd(self, key, fields, maxlen=None, approximate=True):
        if self.fail:
            raise redis.ConnectionError("Connection reset by peer")
        self.sent.append((key, fields, maxlen))


def test_an_announcement_names_the_batch_items_once():
    client = Client()
    assert announce_items(client, ["a", "b-2"])
    assert client.sent == [(ITEM_CHANGES_KEY, {b"items": b"a\nb-2"}, 100_000)]
    assert announce_items(client, [])  # nothing changed: nothing sent
    assert len(client.sent) == 1


def test_an_announcement_that_fails_does_not_fail_the_write_it_follows():
    # The batch's script has already succeeded when the announcement is sent: raising here would
    # make the stream consumer treat an applied batch as failed.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("feature_store.changes")
    level = logger.level
    logger.addHandler(handler)  # on the module's own logger: whatever other tests did to the root
    logger.setLevel(logging.WARNING)
    try:
        assert announce_items(Client(fail=True), ["a"]) is False
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any("not announced" in r.getMessage() for r in records)
