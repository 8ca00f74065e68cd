"""Request validation: a protobuf request in, a typed query out, or :class:`InvalidArgument` naming the field.

Runs on the event loop for every call, so the checks use C-level builtins over the id list
and only walk it in Python to name the offending index once something is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from services.ranking.config import MAX_ID_LENGTH
from services.ranking.errors import InvalidArgument


@dataclass(slots=True)
class Query:
    """One validated request. ``item_ids`` is None for Recommend (the server generates candidates)."""

    user_id: str
    item_ids: list[str] | None
    top_k: int  # Rank: 0 = all; Recommend: how many to return (> 0)
    include_purchased: bool = False


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request body protobuf refused to parse (bytes that are not UTF-8 in a string field, a
    corrupt wire format). Validation answers it with ``error`` instead of gRPC's UNKNOWN."""

    error: InvalidArgument


def tolerant_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``Message.FromString`` that returns :class:`Undecodable` (naming the field) instead of raising."""
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Undecodable(why_undecodable(data, descriptor, exc))

    return parse


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def why_undecodable(data: bytes, descriptor: Descriptor | None, exc: Exception) -> InvalidArgument:
    """Walk the wire format to name the string field whose bytes are not UTF-8 (``item_ids[3]``)."""
    seen: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                size, pos = _varint(data, pos)
                chunk = data[pos : pos + size]
                pos += size
                field = descriptor.fields_by_number.get(number) if descriptor is not None else None
                index = seen[number] = seen.get(number, -1) + 1
                if field is not None and field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError as bad:
                        name = f"{field.name}[{index}]" if field.is_repeated else field.name
                        return InvalidArgument(name, f"is not valid UTF-8 (byte {bad.start})")
            else:
                break
    except ValueError:
        pass
    kind = descriptor.name if descriptor is not None else "request"
    return InvalidArgument("request", f"is not a valid {kind} message ({exc})")


def _check_id(field: str, value: str) -> None:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(field, f"is {len(value)} characters, at most {MAX_ID_LENGTH} allowed")


def validate_rank(request, max_candidates: int) -> Query:  # request: ranking_pb2.RankRequest
    if type(request) is Undecodable:
        raise request.error
    _check_id("user_id", request.user_id)
    ids = list(request.item_ids)
    if not ids:
        raise InvalidArgument("item_ids", "needs at least one candidate")
    if len(ids) > max_candidates:
        raise InvalidArgument("item_ids", f"has {len(ids)} candidates, at most {max_candidates} allowed")
    lengths = list(map(len, ids))
    if min(lengths) == 0 or max(lengths) > MAX_ID_LENGTH:
        for i, item_id in enumerate(ids):
            _check_id(f"item_ids[{i}]", item_id)
    if request.top_k < 0:
        raise InvalidArgument("top_k", f"must be zero (all) or more, got {request.top_k}")
    return Query(request.user_id, ids, request.top_k)


def validate_recommend(request, max_k: int, default_k: int) -> Query:  # ranking_pb2.RecommendRequest
    if type(request) is Undecodable:
        raise request.error
    _check_id("user_id", request.user_id)
    if request.k < 0:
        raise InvalidArgument("k", f"must be zero (the default, {default_k}) or more, got {request.k}")
    if request.k > max_k:
        raise InvalidArgument("k", f"is {request.k}, at most {max_k} allowed")
    return Query(request.user_id, None, request.k or default_k, request.include_purchased)
