"""The one module that knows how recstack's features sit in Feast's Redis online store.

Feast's layout (entity key serialization v3): one Redis hash per entity, keyed by the serialized
entity key followed by the project name; one hash field per feature, named by the 4-byte
little-endian murmur3 of ``"<feature_view>:<feature>"`` and holding a serialized
``feast.types.Value``; one more field ``_ts:<feature_view>`` holding a
``google.protobuf.Timestamp``. Keys and field names are made with Feast's own helpers (checked at
import), values with Feast's own protobuf classes, so Feast's ``get_online_features`` and this
module read and write the same bytes (``tests/integration/test_feast_online.py`` proves it).

Two users of this module:

* the ranking service reads with :func:`read_features` (one non-transactional pipeline for a whole
  request, decoding cached per raw value);
* the stream consumer writes with :class:`FeatureWriter`: one Lua script call per batch that
  checks the partition offsets, the users and the event ids the batch was planned on, merges the
  batch into the stored values and records the new offsets, all atomically (``docs/FEATURES.md``).

The feature dataclasses and update rules live in :mod:`feature_store.values` (no Feast import) and
are re-exported here.

``_ts:<view>`` is the time the values were *written* (the consumer's clock, never moved
backwards), not an event time: the features are lifetime aggregates, so an old event replayed
today still changes them, and Feast must see our latest write as the newest row.
"""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Int64List, StringList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from google.protobuf.timestamp_pb2 import Timestamp

from feature_store.changes import announce_items
from feature_store.definitions import ITEM_VIEW, PROJECT_NAME, USER_VIEW, item_popularity, user_activity
from feature_store.values import (
    DEFAULT_TRENDING_HALF_LIFE_S,
    EVENT_WEIGHTS,
    PURCHASED_ITEMS_MAX,
    RECENT_ITEMS_MAX,
    TOP_CATEGORIES_MAX,
    ItemDelta,
    ItemFeatures,
    UserDelta,
    UserFeatures,
    decay_merge,
    merge_recent,
    merge_user,
)

# ------------------------------------------------------------------------------------ constants

__all__ = [
    "DEFAULT_TRENDING_HALF_LIFE_S",
    "EVENT_WEIGHTS",
    "ITEM_FEATURES",
    "ITEM_FIELDS",
    "PURCHASED_ITEMS_MAX",
    "RECENT_ITEMS_MAX",
    "TOP_CATEGORIES_MAX",
    "USER_FEATURES",
    "USER_FIELDS",
    "ApplyResult",
    "BatchGuard",
    "FeatureWriter",
    "ItemDelta",
    "ItemFeatures",
    "UserDelta",
    "UserFeatures",
    "WriteState",
    "decay_merge",
    "decode_item",
    "decode_user",
    "encode_item",
    "encode_user",
    "item_key",
    "merge_recent",
    "merge_user",
    "read_features",
    "user_key",
    "write_features",
]

USER_FEATURES: tuple[str, ...] = (
    "views",
    "add_to_carts",
    "purchases",
    "last_event_ts",
    "recent_items",
    "purchased_items",
    "top_categories",
    "top_category_weights",
)
ITEM_FEATURES: tuple[str, ...] = (
    "views",
    "add_to_carts",
    "purchases",
    "trending",
    "last_event_ts",
    "category",
    "price",
)
assert [f.name for f in user_activity.features] == list(USER_FEATURES), (
    "definitions.py and online.py disagree"
)
assert [f.name for f in item_popularity.features] == list(ITEM_FEATURES), (
    "definitions.py and online.py disagree"
)

# Hash fields for HMGET, in the order of USER_FEATURES / ITEM_FEATURES, then the timestamp field.
USER_FIELDS: list[bytes] = [_mmh3(f"{USER_VIEW}:{name}") for name in USER_FEATURES] + [
    f"_ts:{USER_VIEW}".encode()
]
ITEM_FIELDS: list[bytes] = [_mmh3(f"{ITEM_VIEW}:{name}") for name in ITEM_FEATURES] + [
    f"_ts:{ITEM_VIEW}".encode()
]

# ------------------------------------------------------------------------------------- entity keys

_PROJECT = PROJECT_NAME.encode()


def _feast_key(join_key: str, value: str) -> bytes:
    entity = EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(string_val=value)])
    return _redis_key(PROJECT_NAME, entity, entity_key_serialization_version=3)


def _key_head(join_key: str) -> bytes:
    # Feast's key for the empty string value is <head><u32 length 0><project>; a key for any
    # other value puts that value's u32 length and UTF-8 bytes between head and project.
    empty = _feast_key(join_key, "")
    return empty[: -(4 + len(_PROJECT))]


_USER_HEAD = _key_head("user_id")
_ITEM_HEAD = _key_head("item_id")
_pack_u32 = struct.Struct("<I").pack


def user_key(user_id: str) -> bytes:
    """Redis key of a user's hash (Feast entity key ``user_id`` + project)."""
    raw = user_id.encode()
    return _USER_HEAD + _pack_u32(len(raw)) + raw + _PROJECT


def item_key(item_id: str) -> bytes:
    """Redis key of an item's hash (Feast entity key ``item_id`` + project)."""
    raw = item_id.encode()
    return _ITEM_HEAD + _pack_u32(len(raw)) + raw + _PROJECT


# Building keys by concatenation is ~10x faster than Feast's proto round trip; refuse to start if
# the two ever disagree (e.g. a Feast upgrade changed the serialization).
for _sample in ("u42", "é-ünïcode-ид", "x" * 128):
    if user_key(_sample) != _feast_key("user_id", _sample) or item_key(_sample) != _feast_key(
        "item_id", _sample
    ):
        raise RuntimeError(
            "feature_store.online: entity key layout differs from Feast's serialize_entity_key v3"
        )

# ------------------------------------------------------------------------------------- decoding

_LIST_KINDS = frozenset(
    {"string_list_val", "int64_list_val", "float_list_val", "double_list_val", "int32_list_val"}
)
# raw Value bytes -> Python value. A Value's bytes carry their own type tag, so one cache serves
# every field. Unchanged hashes (most items between two writes) then decode by dictionary lookup.
_decoded: dict[bytes, Any] = {}
_DECODED_MAX = 200_000


def _value(raw: bytes) -> Any:
    try:
        return _decoded[raw]
    except KeyError:
        pass
    msg = ValueProto()
    msg.ParseFromString(raw)
    kind = msg.WhichOneof("val")
    if kind is None:
        value: Any = None
    elif kind in _LIST_KINDS:
        value = tuple(getattr(msg, kind).val)
    else:
        value = getattr(msg, kind)
    if len(_decoded) >= _DECODED_MAX:
        _decoded.clear()
    _decoded[raw] = value
    return value


def _timestamp_ms(raw: bytes | None) -> int:
    if not raw:
        return 0
    ts = Timestamp()
    ts.ParseFromString(raw)
    return ts.seconds * 1000 + ts.nanos // 1_000_000


_N_USER_FIELDS = len(USER_FIELDS)
_N_ITEM_FIELDS = len(ITEM_FIELDS)


def decode_user(values: Sequence[bytes | None]) -> UserFeatures | None:
    """HMGET reply for :data:`USER_FIELDS` -> :class:`UserFeatures`, ``None`` when the hash is absent."""
    if values.count(None) == _N_USER_FIELDS:
        return None
    views, carts, purchases, last_ts, recent, purchased, cats, cat_weights, ts = values
    return UserFeatures(
        views=_value(views) or 0 if views else 0,
        add_to_carts=_value(carts) or 0 if carts else 0,
        purchases=_value(purchases) or 0 if purchases else 0,
        last_event_ts=_value(last_ts) or 0 if last_ts else 0,
        recent_items=list(_value(recent) or ()) if recent else [],
        purchased_items=list(_value(purchased) or ()) if purchased else [],
        top_categories=list(_value(cats) or ()) if cats else [],
        top_category_weights=list(_value(cat_weights) or ()) if cat_weights else [],
        written_at_ms=_timestamp_ms(ts),
    )


def decode_item(values: Sequence[bytes | None]) -> ItemFeatures | None:
    """HMGET reply for :data:`ITEM_FIELDS` -> :class:`ItemFeatures`, ``None`` when the hash is absent."""
    if values.count(None) == _N_ITEM_FIELDS:
        return None
    views, carts, purchases, trending, last_ts, category, price, ts = values
    return ItemFeatures(
        views=_value(views) or 0 if views else 0,
        add_to_carts=_value(carts) or 0 if carts else 0,
        purchases=_value(purchases) or 0 if purchases else 0,
        trending=_value(trending) or 0.0 if trending else 0.0,
        last_event_ts=_value(last_ts) or 0 if last_ts else 0,
        category=_value(category) or "" if category else "",
        price=_value(price) or 0.0 if price else 0.0,
        written_at_ms=_timestamp_ms(ts),
    )


def read_features(
    client: Any, user_ids: Sequence[str], item_ids: Sequence[str]
) -> tuple[list[UserFeatures | None], list[ItemFeatures | None]]:
    """Users' and items' features in ONE non-transactional pipeline (one round trip).

    ``client`` is a ``redis.Redis`` with bytes responses (``decode_responses=False``). ``None``
    stands for an entity with no features yet (cold start).
    """
    pipe = client.pipeline(transaction=False)
    for user_id in user_ids:
        pipe.hmget(user_key(user_id), USER_FIELDS)
    for item_id in item_ids:
        pipe.hmget(item_key(item_id), ITEM_FIELDS)
    replies = pipe.execute()
    n_users = len(user_ids)
    users = [decode_user(r) for r in replies[:n_users]]
    items = [decode_item(r) for r in replies[n_users:]]
    return users, items


# ------------------------------------------------------------------------------------- encoding


def _timestamp_bytes(ms: int) -> bytes:
    ts = Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)
    return ts.SerializeToString()


def encode_user(features: UserFeatures, written_at_ms: int | None = None) -> dict[bytes, bytes]:
    """The full hash mapping (field -> bytes) of a user, as Feast itself would write it."""
    f = features
    values = (
        ValueProto(int64_val=f.views),
        ValueProto(int64_val=f.add_to_carts),
        ValueProto(int64_val=f.purchases),
        ValueProto(int64_val=f.last_event_ts),
        ValueProto(string_list_val=StringList(val=f.recent_items)),
        ValueProto(string_list_val=StringList(val=f.purchased_items)),
        ValueProto(string_list_val=StringList(val=f.top_categories)),
        ValueProto(int64_list_val=Int64List(val=f.top_category_weights)),
    )
    mapping = {name: v.SerializeToString() for name, v in zip(USER_FIELDS, values, strict=False)}
    mapping[USER_FIELDS[-1]] = _timestamp_bytes(_written_at(written_at_ms, f.written_at_ms))
    return mapping


def encode_item(features: ItemFeatures, written_at_ms: int | None = None) -> dict[bytes, bytes]:
    """The full hash mapping of an item (``category``/``price`` left out when unknown)."""
    f = features
    values: list[ValueProto | None] = [
        ValueProto(int64_val=f.views),
        ValueProto(int64_val=f.add_to_carts),
        ValueProto(int64_val=f.purchases),
        ValueProto(float_val=f.trending),
        ValueProto(int64_val=f.last_event_ts),
        ValueProto(string_val=f.category) if f.category else None,
        ValueProto(float_val=f.price) if f.price else None,
    ]
    mapping = {
        name: v.SerializeToString() for name, v in zip(ITEM_FIELDS, values, strict=False) if v is not None
    }
    mapping[ITEM_FIELDS[-1]] = _timestamp_bytes(_written_at(written_at_ms, f.written_at_ms))
    return mapping


def _written_at(given: int | None, own: int) -> int:
    if given is not None:
        return given
    return own or int(time.time() * 1000)


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


def _lua_bytes(raw: bytes) -> str:
    return '"' + "".join(f"\\{b:03d}" for b in raw) + '"'


_LUA_CODEC = r"""local UF = {%(user_fields)s}
local IF = {%(item_fields)s}

local byte, char, floor, unpack = string.byte, string.char, math.floor, unpack
local concat = table.concat

local function read_varint(s, pos)
  local b = byte(s, pos)
  if not b then error('truncated varint') end
  if b < 128 then return b, pos + 1 end
  local result, mult = b - 128, 128
  pos = pos + 1
  while true do
    b = byte(s, pos)
    if not b then error('truncated varint') end
    pos = pos + 1
    if b < 128 then return result + b * mult, pos end
    result = result + (b - 128) * mult
    mult = mult * 128
  end
end

-- ``tag`` (one byte) followed by the varint of n, a whole number >= 0.
local function tagged_varint(tag, n)
  if n < 128 then return char(tag, n) end
  if n < 16384 then return char(tag, n %% 128 + 128, floor(n / 128)) end
  if n < 2097152 then
    return char(tag, n %% 128 + 128, floor(n / 128) %% 128 + 128, floor(n / 16384))
  end
  if n < 268435456 then
    return char(tag, n %% 128 + 128, floor(n / 128) %% 128 + 128, floor(n / 16384) %% 128 + 128,
      floor(n / 2097152))
  end
  local lo, hi = n %% 268435456, floor(n / 268435456)
  local out = {tag, lo %% 128 + 128, floor(lo / 128) %% 128 + 128, floor(lo / 16384) %% 128 + 128,
    floor(lo / 2097152) + 128}
  while hi >= 128 do
    out[#out + 1] = hi %% 128 + 128
    hi = floor(hi / 128)
  end
  out[#out + 1] = hi
  return char(unpack(out))
end

-- feast.types.Value: int64_val = 4 (tag 32), float_val = 6 (tag 53), double_val = 5 (tag 41),
-- string_val = 2 (tag 18). Absent fields (false) decode to defaults.
local function dec_int(s)
  if not s or byte(s, 1) ~= 32 then return 0 end
  return (read_varint(s, 2))
end

local function enc_int(n)
  if n < 0 then n = 0 end
  return tagged_varint(32, floor(n))
end

local function dec_float(s)
  if not s then return 0 end
  local tag = byte(s, 1)
  if tag == 53 then return (struct.unpack('<f', s, 2)) end
  if tag == 41 then return (struct.unpack('<d', s, 2)) end
  return 0
end

local function enc_float(x) return '\53' .. struct.pack('<f', x) end

-- google.protobuf.Timestamp: seconds = 1 (tag 8), nanos = 2 (tag 16) -> milliseconds.
local function dec_ts_ms(s)
  if not s then return nil end
  local secs, nanos, p, n = 0, 0, 1, #s
  while p <= n do
    local tag = byte(s, p)
    local v
    v, p = read_varint(s, p + 1)
    if tag == 8 then secs = v elseif tag == 16 then nanos = v end
  end
  return secs * 1000 + nanos / 1000000
end

-- A user: ARGV[a .. a+2] are its three counters as the caller read them, ARGV[a+3 .. a+11] its
-- new field values ('' = leave as stored). Returns whether it changed since the read, and its writes.
local function plan_user(key, a)
  local cur = redis.call('HMGET', key, UF[1], UF[2], UF[3])
  local changed = (cur[1] or '') ~= ARGV[a] or (cur[2] or '') ~= ARGV[a + 1] or (cur[3] or '') ~= ARGV[a + 2]
  local w, n = {}, 0
  for f = 1, 9 do
    local v = ARGV[a + 2 + f]
    if v ~= '' then
      w[n + 1] = UF[f]
      w[n + 2] = v
      n = n + 2
    end
  end
  return changed, w
end

-- An item: ARGV[a .. a+6] is the batch's delta (views, carts, purchases, last event ms, trending,
-- category, price), merged here into what is stored. Returns the item's writes.
local function merge_item(key, a, now_ms, now_ts, half_life_ms)
  local dv, dc, dp = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local last, trend = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local category, price = ARGV[a + 5], ARGV[a + 6]
  local cur = redis.call('HMGET', key, IF[1], IF[2], IF[3], IF[4], IF[5], IF[8])
  local old_s, old_t = dec_float(cur[4]), dec_int(cur[5])
  local s
  if last >= old_t then
    if old_s ~= 0 and last > old_t then s = old_s * 2 ^ ((old_t - last) / half_life_ms) + trend
    else s = old_s + trend end
  else
    s = old_s + trend * 2 ^ ((last - old_t) / half_life_ms)
    last = old_t
  end
  local w = {IF[4], enc_float(s), IF[5], enc_int(last)}
  local n = 4
  -- counters the batch does not change are left alone, unless never written (Feast reads 0)
  if dv ~= 0 or not cur[1] then w[n + 1] = IF[1]; w[n + 2] = enc_int(dec_int(cur[1]) + dv); n = n + 2 end
  if dc ~= 0 or not cur[2] then w[n + 1] = IF[2]; w[n + 2] = enc_int(dec_int(cur[2]) + dc); n = n + 2 end
  if dp ~= 0 or not cur[3] then w[n + 1] = IF[3]; w[n + 2] = enc_int(dec_int(cur[3]) + dp); n = n + 2 end
  -- written-at never moves backwards (several writers, skewed clocks)
  local stored_ms = dec_ts_ms(cur[6])
  if not stored_ms or stored_ms < now_ms then w[n + 1] = IF[8]; w[n + 2] = now_ts; n = n + 2 end
  if category ~= '' then w[n + 1] = IF[6]; w[n + 2] = tagged_varint(18, #category) .. category; n = n + 2 end
  if price ~= '' then w[n + 1] = IF[7]; w[n + 2] = enc_float(tonumber(price)); n = n + 2 end
  return w
end
"""

_MERGE_SCRIPT_TEMPLATE = (
    r"""#!lua
-- Apply one stream batch to Feast-layout hashes, guarded by the offset fence, the users'
-- unchanged-since-read check and the event-id dedup. Every check and every read happens before
-- the first write, and a failed check writes nothing, so a batch is applied whole or not at all.
--
-- Users (one partition owns a user) arrive fully merged by the caller, with the raw bytes of the
-- three counters it read: equal bytes mean nobody wrote the user since (every applied event
-- changes one counter). Items are shared by all partitions, so they are merged here.
-- This runs once per batch over thousands of values: the codec below avoids tables and
-- concatenations where it can (Lua 5.1 has no integers; values stay below 2^53).
"""
    + _LUA_CODEC
    + r"""
local now_ms = tonumber(ARGV[1])
local now_ts = ARGV[2]  -- now_ms as an encoded Timestamp
local half_life_ms = tonumber(ARGV[3])
local seen_ttl = ARGV[4]
local n_fence = tonumber(ARGV[5])
local n_seen = tonumber(ARGV[6])
local n_users = tonumber(ARGV[7])
local n_items = tonumber(ARGV[8])
local a = 9
local offsets_key = KEYS[1]

-- 1. offset fence
local offsets = {}
for _ = 1, n_fence do
  local p, expected, applied = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2]
  a = a + 3
  local stored = redis.call('HGET', offsets_key, p)
  local stored_n = -1
  if stored then stored_n = tonumber(stored) end
  if stored_n ~= expected then return {'fence', p, tostring(stored_n)} end
  offsets[#offsets + 1] = p
  offsets[#offsets + 1] = applied
end

-- 2. users unchanged since the caller read them
local writes, n_writes = {}, 0
local stale = {}
local k = 2 + n_seen
for u = 1, n_users do
  local changed, w = plan_user(KEYS[k], a)
  if changed then stale[#stale + 1] = u - 1 end
  a = a + 12
  n_writes = n_writes + 1
  writes[n_writes] = {KEYS[k], w}
  k = k + 1
end
if #stale > 0 then return {'stale', concat(stale, ',')} end

-- 3. items: merge counters and trending into what is stored
for _ = 1, n_items do
  n_writes = n_writes + 1
  writes[n_writes] = {KEYS[k], merge_item(KEYS[k], a, now_ms, now_ts, half_life_ms)}
  a = a + 7
  k = k + 1
end

-- 4. event-id dedup: set every key; if one was already there, undo and report
local dups = {}
for i = 1, n_seen do
  if not redis.call('SET', KEYS[1 + i], ARGV[a + i - 1], 'NX', 'EX', seen_ttl) then dups[#dups + 1] = i end
end
if #dups > 0 then
  local is_dup = {}
  for _, i in ipairs(dups) do is_dup[i] = true end
  for i = 1, n_seen do
    if not is_dup[i] then redis.call('DEL', KEYS[1 + i]) end
  end
  for j = 1, #dups do dups[j] = dups[j] - 1 end
  return {'dup', concat(dups, ',')}
end

-- 5. write
for i = 1, n_writes do
  local w = writes[i][2]
  if #w > 0 then redis.call('HSET', writes[i][1], unpack(w)) end
end
if #offsets > 0 then redis.call('HSET', offsets_key, unpack(offsets)) end
return {'ok'}
"""
)

MERGE_SCRIPT = _MERGE_SCRIPT_TEMPLATE % {
    "user_fields": ", ".join(_lua_bytes(f) for f in USER_FIELDS),
    "item_fields": ", ".join(_lua_bytes(f) for f in ITEM_FIELDS),
}

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

    def __init__(
        self, client: Any, half_life_s: float = DEFAULT_TRENDING_HALF_LIFE_S, user_cache: int = 50_000
    ) -> None:
        self._client = client
        self._half_life_ms = half_life_s * 1000.0
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
            _timestamp_bytes(now),
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
            merged, values = _merge_user_values(current, users[user_id], now, expected_counters)
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
            extend(
                (
                    d.views,
                    d.add_to_carts,
                    d.purchases,
                    d.last_event_ts,
                    repr(d.trending),
                    d.category or "",
                    "" if d.price is None else repr(d.price),
                )
            )
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


def _merge_user_values(
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
        _timestamp_bytes(now_ms) if written_at < now_ms else _UNCHANGED,
    ]
    return merged, values
