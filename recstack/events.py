"""The storefront event of CONTRACT.md section 3: its typed form, its validation and its JSON form.

Everything that reads events (the stream consumer, the event-log readers of training) parses
them here, so the rules are written once. A broken event raises :class:`InvalidEvent` whose
message names the field; that message becomes the dead-letter record's ``error`` header.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

EVENT_TYPES: tuple[str, ...] = ("view", "add_to_cart", "purchase")
MAX_ID_LENGTH = 128
# Columns of an event log (JSON Lines or Parquet), in this order.
COLUMNS: tuple[str, ...] = (
    "event_id",
    "user_id",
    "item_id",
    "event_type",
    "ts",
    "price",
    "quantity",
    "category",
    "session_id",
)
# Epoch milliseconds outside this range are almost certainly seconds or microseconds by mistake.
_MIN_TS_MS = 0
_MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


class InvalidEvent(ValueError):
    """An event that breaks the contract. ``field`` is the offending field (``None``: the whole record)."""

    def __init__(self, field: str | None, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)


@dataclass(frozen=True, slots=True)
class Event:
    """One valid storefront event. ``ts_ms`` is epoch milliseconds (UTC)."""

    event_id: str
    user_id: str
    item_id: str
    event_type: str
    ts_ms: int
    price: float | None = None
    quantity: int = 1
    category: str | None = None
    session_id: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """The contract's JSON object (``ts`` as epoch ms), optional fields only when set."""
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "event_type": self.event_type,
            "ts": self.ts_ms,
        }
        if self.price is not None:
            out["price"] = self.price
        if self.quantity != 1:
            out["quantity"] = self.quantity
        if self.category is not None:
            out["category"] = self.category
        if self.session_id is not None:
            out["session_id"] = self.session_id
        return out

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_json_dict(), separators=(",", ":"), ensure_ascii=False).encode()


def _id_field(obj: dict[str, Any], name: str) -> str:
    if name not in obj:
        raise InvalidEvent(name, "required field is missing")
    value = obj[name]
    if not isinstance(value, str):
        raise InvalidEvent(name, f"must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise InvalidEvent(name, f"must be 1-{MAX_ID_LENGTH} characters, got {len(value)}")
    return value


def parse_timestamp(value: Any, field: str = "ts") -> int:
    """RFC 3339 string or integer epoch milliseconds -> epoch milliseconds."""
    if isinstance(value, bool):
        raise InvalidEvent(field, "must be an RFC 3339 string or integer epoch milliseconds, got bool")
    if isinstance(value, int):
        if not _MIN_TS_MS <= value <= _MAX_TS_MS:
            raise InvalidEvent(field, f"epoch milliseconds out of range: {value}")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidEvent(field, f"not an RFC 3339 timestamp: {value[:64]!r}") from None
        if parsed.tzinfo is None or "T" not in text.upper():
            raise InvalidEvent(field, f"RFC 3339 needs a date, a time and a UTC offset: {value[:64]!r}")
        ms = int(parsed.astimezone(UTC).timestamp() * 1000)
        if not _MIN_TS_MS <= ms <= _MAX_TS_MS:
            raise InvalidEvent(field, f"timestamp out of range: {value[:64]!r}")
        return ms
    raise InvalidEvent(
        field, f"must be an RFC 3339 string or integer epoch milliseconds, got {type(value).__name__}"
    )


def _optional_str(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEvent(name, f"must be a string, got {type(value).__name__}")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidEvent(name, f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}")
    return value


def validate(obj: Any) -> Event:
    """A decoded JSON value -> :class:`Event`, or :class:`InvalidEvent` naming the field."""
    if not isinstance(obj, dict):
        raise InvalidEvent(None, f"event must be a JSON object, got {type(obj).__name__}")
    event_id = _id_field(obj, "event_id")
    user_id = _id_field(obj, "user_id")
    item_id = _id_field(obj, "item_id")
    if "event_type" not in obj:
        raise InvalidEvent("event_type", "required field is missing")
    event_type = obj["event_type"]
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        raise InvalidEvent("event_type", f"must be one of {', '.join(EVENT_TYPES)}, got {event_type!r:.64}")
    if "ts" not in obj:
        raise InvalidEvent("ts", "required field is missing")
    ts_ms = parse_timestamp(obj["ts"])

    price = obj.get("price")
    if price is not None:
        if isinstance(price, bool) or not isinstance(price, int | float):
            raise InvalidEvent("price", f"must be a number, got {type(price).__name__}")
        if not math.isfinite(price) or price < 0:
            raise InvalidEvent("price", f"must be a finite number >= 0, got {price}")
        price = float(price)
    quantity = obj.get("quantity", 1)
    if quantity is None:
        quantity = 1
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        raise InvalidEvent("quantity", f"must be an integer, got {type(quantity).__name__}")
    if not -(2**31) <= quantity < 2**31:
        raise InvalidEvent("quantity", f"out of range: {quantity}")
    return Event(
        event_id=event_id,
        user_id=user_id,
        item_id=item_id,
        event_type=event_type,
        ts_ms=ts_ms,
        price=price,
        quantity=quantity,
        category=_optional_str(obj, "category"),
        session_id=_optional_str(obj, "session_id"),
    )


def parse_event(raw: bytes | str) -> Event:
    """Kafka message value (UTF-8 JSON) -> :class:`Event`, or :class:`InvalidEvent` with the reason."""
    if raw is None:
        raise InvalidEvent(None, "message has no value")
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent(None, f"value is not UTF-8: {exc.reason} at byte {exc.start}") from None
    else:
        text = raw
    try:
        obj = json.loads(text)
    except RecursionError:
        raise InvalidEvent(None, "value is not JSON: nested too deeply") from None
    except ValueError as exc:
        raise InvalidEvent(None, f"value is not JSON: {exc}") from None
    return validate(obj)


def ms_to_datetime(ts_ms: int) -> datetime:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
