"""The item change feed: which items' features a stream batch has just changed.

Rankers keep every item's features they serve in process (services.ranking.catalogue) and must
learn within a fraction of a second which of them changed, without reading the whole catalogue
again. After each batch is applied, the stream consumer appends the ids of the batch's items to
one Redis stream (:data:`ITEM_CHANGES_KEY`, one entry per batch, capped at about
:data:`MAX_ENTRIES` entries); a ranker reads the entries after the last one it saw and re-reads
only those items.

The announcement follows the write, so whoever reads an announcement reads the new values. It
is not part of the write's transaction: a consumer that dies between the two leaves a change
unannounced, which a ranker's periodic full re-read (``--item-resync-s``) repairs; a reader
that fell behind the cap (:func:`read_item_changes` says so) re-reads everything it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)

ITEM_CHANGES_KEY = b"recstack:item-changes"
# ~100k batches: minutes of history at full stream speed, a few MB; readers poll every 250 ms.
MAX_ENTRIES = 100_000
_FIELD = b"items"
_SEP = b"\n"  # item ids are printable (recstack.events refuses control characters)


def announce_items(client: Any, item_ids: Iterable[str]) -> bool:
    """Append one entry naming ``item_ids`` (nothing when empty). ``client``: redis-py, any mode.

    Best effort: it runs after the batch's write has succeeded, so a failure here (Redis went
    away in between) must not make the caller think the write failed and apply it again; the
    readers' periodic re-read covers the lost announcement. Returns whether it was sent."""
    ids = [i.encode() for i in item_ids]
    if not ids:
        return True
    try:
        client.xadd(ITEM_CHANGES_KEY, {_FIELD: _SEP.join(ids)}, maxlen=MAX_ENTRIES, approximate=True)
    except (redis.RedisError, OSError) as exc:
        log.warning(
            "item change feed: %d changed items not announced (%s); readers re-read them at resync",
            len(ids),
            exc,
        )
        return False
    return True


@dataclass(slots=True)
class ItemChanges:
    last_id: bytes  # pass it to the next read
    item_ids: set[str]
    # True when entries after the given id were trimmed away unread (or the stream was reset):
    # the reader cannot know what changed and should re-read everything it holds.
    gap: bool


def latest_id(client: Any) -> bytes:
    """The id of the newest entry (``0-0`` when there is none): where a new reader starts."""
    entries = client.xrevrange(ITEM_CHANGES_KEY, count=1)
    return entries[0][0] if entries else b"0-0"


def read_item_changes(client: Any, after: bytes, count: int = 10_000) -> ItemChanges:
    """The items named by up to ``count`` entries after ``after``, in one round trip.

    The read starts AT ``after``: trimming removes the oldest entries first, so while ``after``
    itself is still there nothing after it was lost. When it is gone (the reader fell more than
    the cap behind, or the stream was deleted with the rest of Redis's data) the answer is a gap,
    and the next read continues from the newest entry."""
    entries = client.xrange(ITEM_CHANGES_KEY, min=after, count=count + 1)
    items: set[str] = set()
    if after != b"0-0":
        if not entries or entries[0][0] != after:
            newest = entries[-1][0] if entries else latest_id(client)
            return ItemChanges(newest, items, gap=True)
        entries = entries[1:]
    last = after
    for entry_id, fields in entries:
        last = entry_id
        raw = fields.get(_FIELD)
        if raw:
            items.update(x.decode() for x in raw.split(_SEP))
    return ItemChanges(last, items, gap=False)
