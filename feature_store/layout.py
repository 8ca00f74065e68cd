"""Where recstack's features sit in Feast's Redis online store: key names and field encoding.

Feast's layout (entity key serialization v3): one Redis hash per entity, keyed by the serialized
entity key followed by the project name; one hash field per feature, named by the 4-byte
little-endian murmur3 of ``"<feature_view>:<feature>"`` and holding a serialized
``feast.types.Value``; one more field ``_ts:<feature_view>`` holding a
``google.protobuf.Timestamp``. Keys and field names are made with Feast's own helpers (checked at
import), values with Feast's own protobuf classes, so Feast's ``get_online_features`` and this
package read and write the same bytes (``tests/integration/test_feast_online.py`` proves it).

The users of the layout: :mod:`feature_store.reads` (the ranking service's reads),
:mod:`feature_store.writes` (the stream consumer's batch merges, and whole-entity writes for
tests and demos) and :mod:`feature_store.cluster` (the same merges on a Redis Cluster). The merge
scripts in ``feature_store/lua/`` name the same fields (:mod:`feature_store.scripts` fills them in).
The feature dataclasses and update rules live in :mod:`feature_store.values` (no Feast import).

``_ts:<view>`` is the time the values were *written* (the consumer's clock, never moved
backwards), not an event time: the features are lifetime aggregates, so an old event replayed
today still changes them, and Feast must see our latest write as the newest row.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from typing import Any

from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Int64List, StringList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from google.protobuf.timestamp_pb2 import Timestamp

from feature_store.definitions import ITEM_VIEW, PROJECT_NAME, USER_VIEW, item_popularity, user_activity
from feature_store.values import ItemFeatures, UserFeatures

# ------------------------------------------------------------------------------------ feature names

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
    "definitions.py and layout.py disagree"
)
assert [f.name for f in item_popularity.features] == list(ITEM_FEATURES), (
    "definitions.py and layout.py disagree"
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
            "feature_store.layout: entity key layout differs from Feast's serialize_entity_key v3"
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


# ------------------------------------------------------------------------------------- encoding


def timestamp_bytes(ms: int) -> bytes:
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
    mapping[USER_FIELDS[-1]] = timestamp_bytes(_written_at(written_at_ms, f.written_at_ms))
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
    mapping[ITEM_FIELDS[-1]] = timestamp_bytes(_written_at(written_at_ms, f.written_at_ms))
    return mapping


def _written_at(given: int | None, own: int) -> int:
    if given is not None:
        return given
    return own or int(time.time() * 1000)
