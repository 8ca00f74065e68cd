"""The storefront event of CONTRACT.md section 3: its typed form, its validation and its JSON form.

Everything that reads events (the stream consumer, the event-log readers of training) parses
them here, so the rules are written once. A broken event raises :class:`InvalidEvent` whose
message names the field; that message becomes the dead-letter record's ``error`` header.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_EVENT_TYPE_SET = frozenset(EVENT_TYPES)
# The largest finite float: an integer price beyond it cannot become a float (and is refused).
_MAX_PRICE = sys.float_info.max


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
    # The ranking answer this event followed (RankResponse.request_id), when the storefront knows
    # it: the attribution consumer credits that impression (docs/EXPERIMENTS.md).
    request_id: str | None = None

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
        if self.request_id is not None:
            out["request_id"] = self.request_id
        return out

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_json_dict(), separators=(",", ":"), ensure_ascii=False).encode()


# A frozen dataclass sets each field through object.__setattr__; writing the slots directly makes
# the same object in half the time, which matters at 20,000 events/s.
_new_object = object.__new__
(
    _set_event_id,
    _set_user_id,
    _set_item_id,
    _set_event_type,
    _set_ts_ms,
    _set_price,
    _set_quantity,
    _set_category,
    _set_session_id,
    _set_request_id,
) = (getattr(Event, name).__set__ for name in Event.__slots__)


def _make_event(
    event_id: str,
    user_id: str,
    item_id: str,
    event_type: str,
    ts_ms: int,
    price: float | None,
    quantity: int,
    category: str | None,
    session_id: str | None,
    request_id: str | None = None,
) -> Event:
    event = _new_object(Event)
    _set_event_id(event, event_id)
    _set_user_id(event, user_id)
    _set_item_id(event, item_id)
    _set_event_type(event, event_type)
    _set_ts_ms(event, ts_ms)
    _set_price(event, price)
    _set_quantity(event, quantity)
    _set_category(event, category)
    _set_session_id(event, session_id)
    _set_request_id(event, request_id)
    return event


def _is_text(value: str) -> bool:
    """False for a string holding a lone surrogate, which JSON's ``\\ud800`` escape can produce:
    it is not Unicode text and cannot be encoded as UTF-8 (Kafka and Redis keys, the event log)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_NOT_TEXT = "is not valid Unicode text (it holds a lone surrogate such as \\ud800)"


def _id_field(obj: dict[str, Any], name: str) -> str:
    if name not in obj:
        raise InvalidEvent(name, "required field is missing")
    value = obj[name]
    if not isinstance(value, str):
        raise InvalidEvent(name, f"must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise InvalidEvent(name, f"must be 1-{MAX_ID_LENGTH} characters, got {len(value)}")
    if not _is_text(value):
        raise InvalidEvent(name, _NOT_TEXT)
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
        ms = (parsed - _EPOCH) // _ONE_MS  # exact, and no overflow near the ends of the calendar
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
    if not _is_text(value):
        raise InvalidEvent(name, _NOT_TEXT)
    return value


def validate(obj: Any) -> Event:
    """A decoded JSON value -> :class:`Event`, or :class:`InvalidEvent` naming the field."""
    if type(obj) is dict:
        event = _validate_plain(obj)
        if event is not None:
            return event
    return _validate_checked(obj)


def _validate_plain(obj: dict[str, Any]) -> Event | None:
    """The common case in one pass: an event whose every field has its plain JSON type and a
    value in range. Anything else (None) goes to :func:`_validate_checked`, which accepts
    exactly the same events and finds the reason for the others."""
    get = obj.get
    event_id = get("event_id")
    user_id = get("user_id")
    item_id = get("item_id")
    event_type = get("event_type")
    ts = get("ts")
    if not (
        type(event_id) is str
        and type(user_id) is str
        and type(item_id) is str
        and type(event_type) is str
        and type(ts) is int
        and 0 < len(event_id) <= MAX_ID_LENGTH
        and 0 < len(user_id) <= MAX_ID_LENGTH
        and 0 < len(item_id) <= MAX_ID_LENGTH
        and event_type in _EVENT_TYPE_SET
        and _MIN_TS_MS <= ts <= _MAX_TS_MS
    ):
        return None
    if not (event_id.isascii() and user_id.isascii() and item_id.isascii()) and not (
        _is_text(event_id) and _is_text(user_id) and _is_text(item_id)
    ):
        return None
    price = get("price")
    if price is not None:
        if type(price) is float or type(price) is int:
            if not 0 <= price <= _MAX_PRICE:
                return None
            price = float(price)
        else:
            return None
    quantity = get("quantity")
    if quantity is None:
        quantity = 1
    elif type(quantity) is not int or not -(2**31) <= quantity < 2**31:
        return None
    category = get("category")
    if category is not None and (
        type(category) is not str or len(category) > MAX_ID_LENGTH or not _is_text(category)
    ):
        return None
    session_id = get("session_id")
    if session_id is not None and (
        type(session_id) is not str or len(session_id) > MAX_ID_LENGTH or not _is_text(session_id)
    ):
        return None
    request_id = get("request_id")
    if request_id is not None and (
        type(request_id) is not str or len(request_id) > MAX_ID_LENGTH or not _is_text(request_id)
    ):
        return None
    return _make_event(
        event_id, user_id, item_id, event_type, ts, price, quantity, category, session_id, request_id
    )


def _validate_checked(obj: Any) -> Event:
    """Field by field, in a fixed order, raising :class:`InvalidEvent` for the first broken one."""
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
        if not 0 <= price <= _MAX_PRICE:  # NaN and infinities fail this too
            raise InvalidEvent("price", f"must be a finite number >= 0, got {price!r:.40}")
        price = float(price)
    quantity = obj.get("quantity", 1)
    if quantity is None:
        quantity = 1
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        raise InvalidEvent("quantity", f"must be an integer, got {type(quantity).__name__}")
    if not -(2**31) <= quantity < 2**31:
        raise InvalidEvent("quantity", f"out of range: {quantity}")
    category = _optional_str(obj, "category")
    session_id = _optional_str(obj, "session_id")
    request_id = _optional_str(obj, "request_id")
    return _make_event(
        event_id, user_id, item_id, event_type, ts_ms, price, quantity, category, session_id, request_id
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


_scan_once = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # the scanner json.loads uses


def parse_events(values: Sequence[bytes | None]) -> list[Event | InvalidEvent]:
    """Many Kafka message values -> one :class:`Event` or :class:`InvalidEvent` each, in order.

    Same result as calling :func:`parse_event` on each value, but an ASCII batch is decoded in
    one call and each value is scanned in place. A value the fast path cannot take whole (not
    exactly one JSON value, surrounding whitespace, absent) goes through :func:`parse_event`, so
    every reason is the one it would give.
    """
    try:
        joined = b"".join(values)  # type: ignore[arg-type]
    except TypeError:  # a record without a value
        return _parse_each_value(values)
    if not joined.isascii():  # offsets in the decoded text would differ from byte offsets
        return _parse_each_value(values)
    text = joined.decode("ascii")
    scan = _scan_once
    out: list[Event | InvalidEvent] = []
    append = out.append
    pos = 0
    for raw in values:
        end = pos + len(raw)  # type: ignore[arg-type]
        try:
            obj, stop = scan(text, pos)
        except (StopIteration, ValueError, RecursionError):
            stop = -1
        if stop == end:
            try:
                append(validate(obj))
            except InvalidEvent as exc:
                append(exc)
            except Exception as exc:  # a validation bug must not stop a consumer: dead-letter it
                append(_unexpected(exc))
        else:
            append(_parse_or_reason(raw))
        pos = end
    return out


def _parse_each_value(values: Sequence[bytes | None]) -> list[Event | InvalidEvent]:
    out: list[Event | InvalidEvent] = []
    for raw in values:
        try:
            text = raw.decode("utf-8")  # type: ignore[union-attr]
            obj, stop = _scan_once(text, 0)
        except (AttributeError, UnicodeDecodeError, StopIteration, ValueError, RecursionError):
            stop = -1
        out.append(_validate_or_reason(obj) if stop >= 0 and stop == len(text) else _parse_or_reason(raw))
    return out


def _unexpected(exc: Exception) -> InvalidEvent:
    return InvalidEvent(None, f"could not be validated ({type(exc).__name__}: {exc})")


def _validate_or_reason(obj: Any) -> Event | InvalidEvent:
    try:
        return validate(obj)
    except InvalidEvent as exc:
        return exc
    except Exception as exc:  # a validation bug must not stop a consumer: dead-letter the record
        return _unexpected(exc)


def _parse_or_reason(raw: bytes | None) -> Event | InvalidEvent:
    try:
        return parse_event(raw)  # type: ignore[arg-type]
    except InvalidEvent as exc:
        return exc
    except Exception as exc:  # a validation bug must not stop a consumer: dead-letter the record
        return _unexpected(exc)


def refuse_future_events(parsed: list[Event | InvalidEvent], now_ms: int, max_skew_ms: int) -> int:
    """Replace, in place, each event stamped more than ``max_skew_ms`` after ``now_ms`` (the
    reader's clock) by an :class:`InvalidEvent` naming ``ts``; returns how many. Exactly
    ``max_skew_ms`` ahead is accepted. One far-future event would otherwise hold its item's
    ``trending`` reference and its user's ``last_event_ts`` there for good (both keep a maximum)."""
    limit = now_ms + max_skew_ms
    refused = 0
    for i, event in enumerate(parsed):
        if type(event) is Event and event.ts_ms > limit:
            ahead_s = (event.ts_ms - now_ms) / 1000
            stamp = ms_to_datetime(event.ts_ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            parsed[i] = InvalidEvent(
                "ts",
                f"{stamp} is {ahead_s:,.0f} s ahead of the consumer's clock, more than the "
                f"{max_skew_ms / 1000:g} s allowed (--max-future-skew)",
            )
            refused += 1
    return refused


def ms_to_datetime(ts_ms: int) -> datetime:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
