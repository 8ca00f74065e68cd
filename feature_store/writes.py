"""Writes to the online store: the stream consumer's batch merges, and whole entities for seeding.

The stream consumer writes with :class:`FeatureWriter`: one Lua script call per batch
(``feature_store/lua/merge.lua``) that checks the partition offsets, the users and the event ids
the batch was planned on, merges the batch into the stored values and records the new offsets,
all atomically (``docs/FEATURES.md``). :mod:`feature_store.cluster` does the same on a Redis
Cluster with the types and helpers defined here. :func:`write_features` overwrites whole
entities (tests, demos, load tests).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from feast.protos.feast.types.Value_pb2 import Int64List, StringList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from feature_store import spec
from feature_store.changes import announce_items
from feature_store.layout import (
    USER_FIELDS,
    decode_user,
    encode_item,
    encode_user,
    item_key,
    timestamp_bytes,
    user_key,
)
from feature_store.scripts import MERGE_SCRIPT
from feature_store.values import ItemDelta, ItemFeatures, UserDelta, UserFeatures, merge_user


def write_features(
    client: Any,
    users: Mapping[str, UserFeatures] | None = None,
    items: Mapping[str, ItemFeatures] | None = None,
    written_at_ms: int | None = None,
) -> None:
    """Overwrite whole entities in one transaction (for seeding tests and demos).

    The stream consumer never does this: it merges batches through :class:`FeatureWriter`. On a
    Redis Cluster (a client with a ``nodes_manager``) entities span slots, so the pipeline is not a
    transaction there: each entity is replaced on its own.
    """
    pipe = client.pipeline(transaction=getattr(client, "nodes_manager", None) is None)
    for user_id, uf in (users or {}).items():
        key = user_key(user_id)
        pipe.delete(key)
        pipe.hset(key, mapping=encode_user(uf, written_at_ms))
    for item_id, itf in (items or {}).items():
        key = item_key(item_id)
        pipe.delete(key)
        pipe.hset(key, mapping=encode_item(itf, written_at_ms))
    pipe.execute()


# ------------------------------------------------------------------------------- stream writes


def trending_half_life_ms(half_life_s: float | None) -> float:
    """Half-life of ``trending`` in ms (``None``: :data:`feature_store.spec.TRENDING_HALF_LIFE_S`)."""
    return (spec.TRENDING_HALF_LIFE_S if half_life_s is None else half_life_s) * 1000.0


@dataclass(slots=True)
class BatchGuard:
    """What makes a batch write idempotent: the offset fence and the event-id dedup.

    ``offsets_key`` is a hash partition -> last applied offset. The write happens only if every
    partition in ``expected`` still holds the expected offset (-1: none yet); it then stores
    ``applied``. ``seen_keys`` must all be absent; they are set to ``seen_values`` with a TTL.
    """

    offsets_key: bytes | str
    expected: dict[int, int]
    applied: dict[int, int]
    seen_keys: list[bytes] = field(default_factory=list)
    seen_values: list[bytes] = field(default_factory=list)
    seen_ttl_s: int = 86_400
    # Redis Cluster only (feature_store.cluster): slot -> partitions whose records write there,
    # and (slot, partition) -> offset up to which that slot already holds the partition's effects.
    slot_partitions: dict[int, set[int]] = field(default_factory=dict)
    floors: dict[tuple[int, int], int] = field(default_factory=dict)


@dataclass(slots=True)
class WriteState:
    """The stored values a batch write is computed from, read in one pipeline (:meth:`FeatureWriter.read`)."""

    users: dict[str, list[bytes | None]]  # user id -> HMGET reply for USER_FIELDS
    seen: list[bytes | None]  # value of each key asked for, None when absent


@dataclass(slots=True)
class ApplyResult:
    """Outcome of :meth:`FeatureWriter.apply`; when ``ok`` is False nothing was written."""

    ok: bool
    fenced_partition: int | None = None  # a partition whose stored offset differed from the expected one
    stored_offset: int | None = None  # what it held
    seen_duplicates: list[int] = field(default_factory=list)  # indexes into guard.seen_keys already set
    stale_users: list[str] = field(default_factory=list)  # users written by someone else since the read
    # Redis Cluster only: (slot, partition) -> offset whose effects that slot holds (leave them out)
    floors: dict[tuple[int, int], int] = field(default_factory=dict)
    # Redis Cluster only: partition -> the lowest offset a slot's fence went back to, below what
    # this writer had stored there (the node lost acknowledged writes)
    behind: dict[int, int] = field(default_factory=dict)


_UNCHANGED = b""  # a field the merge script leaves as it is (an encoded Value is never empty)


class RememberedUsers(dict):
    """User id -> (features as stored, raw bytes of the three counters as stored), for the users a
    writer wrote itself: the next batch needs neither their read nor their decoding. At most
    ``size`` of them, the least recently written dropped first (re-inserting keeps the dict in
    that order). A plain dict underneath, so lookups on the hot path cost what a dict's do."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forget(self, user_ids: Iterable[str] | None = None) -> None:
        """Drop remembered users (all of them by default), e.g. when a partition changes owner."""
        if user_ids is None:
            self.clear()
        else:
            for user_id in user_ids:
                self.pop(user_id, None)

    def remember(self, written: Iterable[tuple[str, UserFeatures, tuple[bytes, bytes, bytes]]]) -> None:
        for user_id, features, counters in written:
            self.pop(user_id, None)
            self[user_id] = (features, counters)
        excess = len(self) - self.size
        if excess > 0:
            for user_id in list(itertools.islice(self, excess)):
                del self[user_id]


class FeatureWriter:
    """Applies stream batches to the online store: :meth:`read`, then :meth:`apply` (one script call).

    Users written through this writer are remembered (up to ``user_cache`` of them, least recently
    used out first) so that the next batch needs neither their read nor their decoding. A
    remembered user written meanwhile by someone else is caught by the script's unchanged-since-read
    check (``stale_users``), forgotten, and read again by the caller's retry.
    """

    def __init__(self, client: Any, half_life_s: float | None = None, user_cache: int = 50_000) -> None:
        """``half_life_s``: of ``trending`` (default :data:`feature_store.spec.TRENDING_HALF_LIFE_S`)."""
        self._client = client
        self._half_life_ms = trending_half_life_ms(half_life_s)
        self._script = client.register_script(MERGE_SCRIPT)
        self._known = RememberedUsers(user_cache)

    def read(
        self,
        user_ids: Sequence[str],
        seen_keys: Sequence[bytes] = (),
        claims: Sequence[bytes] = (),
        claim_ttl_s: int = 86_400,
    ) -> WriteState:
        """The stored hashes of the users not remembered, and the values of ``seen_keys``, in one pipeline.

        ``claims`` (used by the cluster writer) are ignored: here the dedup keys are set by the
        batch's own script, atomically with its writes."""
        known = self._known
        to_read = [u for u in user_ids if u not in known]
        pipe = self._client.pipeline(transaction=False)
        for user_id in to_read:
            pipe.hmget(user_key(user_id), USER_FIELDS)
        if seen_keys:
            pipe.mget(seen_keys)
        replies = pipe.execute() if to_read or seen_keys else []
        users = dict(zip(to_read, replies, strict=False))
        return WriteState(users=users, seen=replies[-1] if seen_keys else [])

    def forget(self, user_ids: Sequence[str] | None = None) -> None:
        """Drop remembered users (all of them by default), e.g. when a partition changes owner."""
        self._known.forget(user_ids)

    def apply(
        self,
        users: Mapping[str, UserDelta],
        items: Mapping[str, ItemDelta],
        guard: BatchGuard,
        state: WriteState,
        now_ms: int | None = None,
    ) -> ApplyResult:
        """Merge ``users`` and ``items`` atomically if ``guard`` passes.

        ``state`` comes from :meth:`read` for these users (remembered users need not be in it).
        """
        now = int(time.time() * 1000) if now_ms is None else now_ms
        keys: list[bytes | str] = [guard.offsets_key, *guard.seen_keys]
        args: list[Any] = [
            now,
            timestamp_bytes(now),
            repr(self._half_life_ms),
            guard.seen_ttl_s,
            len(guard.expected),
            len(guard.seen_keys),
            len(users),
            len(items),
        ]
        for partition, expected in guard.expected.items():
            args += (partition, expected, guard.applied[partition])
        user_ids = list(users)
        written: list[tuple[str, UserFeatures, tuple[bytes, bytes, bytes]]] = []
        known = self._known
        stored_users = state.users
        for user_id in user_ids:
            keys.append(user_key(user_id))
            reply = stored_users.get(user_id)
            if reply is not None:
                current, expected_counters = (
                    decode_user(reply),
                    (reply[0] or b"", reply[1] or b"", reply[2] or b""),
                )
            else:
                current, expected_counters = known[user_id]
            merged, values = merge_user_values(current, users[user_id], now, expected_counters)
            args += expected_counters
            args += values
            # the counters as stored afterwards: written ones, or the ones left as they were
            stored_counters = (
                values[0] or expected_counters[0],
                values[1] or expected_counters[1],
                values[2] or expected_counters[2],
            )
            written.append((user_id, merged, stored_counters))
        extend = args.extend
        for item_id, d in items.items():
            keys.append(item_key(item_id))
            extend(item_delta_args(d))
        extend(guard.seen_values)
        reply = self._script(keys=keys, args=args)
        status = reply[0]
        if status == b"ok":
            self._known.remember(written)
            announce_items(self._client, items)  # after the write: readers then see the new values
            return ApplyResult(ok=True)
        if status == b"fence":
            return ApplyResult(ok=False, fenced_partition=int(reply[1]), stored_offset=int(reply[2]))
        if status == b"dup":
            return ApplyResult(ok=False, seen_duplicates=[int(x) for x in reply[1].split(b",")])
        if status == b"stale":
            stale = [user_ids[int(x)] for x in reply[1].split(b",")]
            self.forget(stale)
            return ApplyResult(ok=False, stale_users=stale)
        raise RuntimeError(f"unexpected reply from the merge script: {reply!r}")


def item_delta_args(d: ItemDelta) -> tuple[Any, ...]:
    """An item's 7 script arguments (``merge_item`` in ``lua/codec.lua`` merges them into the stored
    item): counters, last event time, trending, category and price (``""``: unknown)."""
    return (
        d.views,
        d.add_to_carts,
        d.purchases,
        d.last_event_ts,
        repr(d.trending),
        d.category or "",
        "" if d.price is None else repr(d.price),
    )


def merge_user_values(
    current: UserFeatures | None, delta: UserDelta, now_ms: int, stored_counters: tuple[bytes, bytes, bytes]
) -> tuple[UserFeatures, list[bytes]]:
    """The merged user and the 9 encoded field values for the script (``_UNCHANGED``: left as stored).

    A counter the batch does not change is left alone, unless it was never written (so that Feast
    reads 0 rather than nothing)."""
    merged = merge_user(current, delta)
    written_at = merged.written_at_ms
    if written_at < now_ms:  # written-at never moves backwards (several writers, skewed clocks)
        merged.written_at_ms = now_ms
    values = [
        ValueProto(int64_val=merged.views).SerializeToString()
        if delta.views or not stored_counters[0]
        else _UNCHANGED,
        ValueProto(int64_val=merged.add_to_carts).SerializeToString()
        if delta.add_to_carts or not stored_counters[1]
        else _UNCHANGED,
        ValueProto(int64_val=merged.purchases).SerializeToString()
        if delta.purchases or not stored_counters[2]
        else _UNCHANGED,
        ValueProto(int64_val=merged.last_event_ts).SerializeToString(),
        ValueProto(string_list_val=StringList(val=merged.recent_items)).SerializeToString(),
        ValueProto(string_list_val=StringList(val=merged.purchased_items)).SerializeToString()
        if delta.purchased_items
        else _UNCHANGED,
        ValueProto(string_list_val=StringList(val=merged.top_categories)).SerializeToString()
        if delta.category_weights
        else _UNCHANGED,
        ValueProto(int64_list_val=Int64List(val=merged.top_category_weights)).SerializeToString()
        if delta.category_weights
        else _UNCHANGED,
        timestamp_bytes(now_ms) if written_at < now_ms else _UNCHANGED,
    ]
    return merged, values
