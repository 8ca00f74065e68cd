"""The event contract (docs/CONTRACT.md section 3): property tests of validation and of the batch parser.

Every valid event is accepted as it is; every malformed shape is rejected with a reason that
names the offending field; ``parse_events`` gives exactly what ``parse_event`` gives per value.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recstack.events import (
    EVENT_TYPES,
    MAX_ID_LENGTH,
    Event,
    InvalidEvent,
    _validate_checked,
    parse_event,
    parse_events,
    validate,
)

REQUIRED = ("event_id", "user_id", "item_id", "event_type", "ts")
MAX_TS_MS = 253_402_300_799_999

ids = st.text(min_size=1, max_size=MAX_ID_LENGTH)
epoch_ms = st.integers(min_value=0, max_value=MAX_TS_MS)
rfc3339 = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
).map(lambda d: d.isoformat())
prices = st.one_of(
    st.none(),
    st.integers(min_value=0, max_value=10**9),
    st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False),
)
quantities = st.integers(min_value=-(2**31), max_value=2**31 - 1)
optional_text = st.one_of(st.none(), st.text(max_size=MAX_ID_LENGTH))


@st.composite
def valid_events(draw) -> dict:
    obj = {
        "event_id": draw(ids),
        "user_id": draw(ids),
        "item_id": draw(ids),
        "event_type": draw(st.sampled_from(EVENT_TYPES)),
        "ts": draw(st.one_of(epoch_ms, rfc3339)),
    }
    for name, strategy in (
        ("price", prices),
        ("quantity", quantities),
        ("category", optional_text),
        ("session_id", optional_text),
    ):
        if draw(st.booleans()):
            obj[name] = draw(strategy)
    if draw(st.booleans()):  # unknown extra fields are ignored
        obj[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in obj))] = draw(
            st.one_of(st.integers(), st.text(), st.none())
        )
    return obj


def _expected_ts(value) -> int:
    if isinstance(value, int):
        return value
    return (datetime.fromisoformat(value) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


@given(valid_events())
def test_every_valid_event_is_accepted_as_it_is(obj):
    event = validate(obj)
    assert (event.event_id, event.user_id, event.item_id, event.event_type) == (
        obj["event_id"],
        obj["user_id"],
        obj["item_id"],
        obj["event_type"],
    )
    assert event.ts_ms == _expected_ts(obj["ts"])
    if obj.get("price") is not None:
        assert event.price == float(obj["price"])
    assert event.quantity == (obj.get("quantity") if obj.get("quantity") is not None else 1)
    assert parse_event(json.dumps(obj).encode()) == event
    # and the JSON form round-trips
    assert parse_event(event.to_json_bytes()) == event


# (field, a value that breaks it); None as the value means "the field is missing".
_BREAKERS = st.one_of(
    st.tuples(st.sampled_from(REQUIRED), st.just(None)),
    st.tuples(
        st.sampled_from(("event_id", "user_id", "item_id")),
        st.one_of(
            st.just(""),
            st.text(min_size=MAX_ID_LENGTH + 1, max_size=MAX_ID_LENGTH + 20),
            st.integers(),
            st.floats(allow_nan=False),
            st.booleans(),
            st.lists(st.text(), max_size=2),
            st.just({}),
        ),
    ),
    st.tuples(
        st.just("event_type"),
        st.one_of(
            st.text().filter(lambda t: t not in EVENT_TYPES), st.integers(), st.booleans(), st.just([])
        ),
    ),
    st.tuples(
        st.just("ts"),
        st.one_of(
            st.integers(max_value=-1),
            st.integers(min_value=MAX_TS_MS + 1),
            st.booleans(),
            st.floats(allow_nan=False),
            st.text(alphabet="abcxyz:- ", max_size=20),
            st.just("2024-01-01"),  # no time
            st.just("2024-01-01T10:00:00"),  # no UTC offset
            st.just("9999-12-31T23:00:00-05:00"),  # past the end of the calendar in UTC
            st.just("0001-01-01T00:00:00+05:00"),  # before its start
            st.just([]),
        ),
    ),
    st.tuples(
        st.just("price"),
        st.one_of(
            st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
            st.integers(max_value=-1),
            st.just(math.inf),
            st.just(math.nan),
            st.booleans(),
            st.text(max_size=5),
            st.just([1]),
            st.integers(min_value=10**309, max_value=10**400),  # no float can hold it
        ),
    ),
    st.tuples(
        st.just("quantity"),
        st.one_of(
            st.floats(allow_nan=False),
            st.text(max_size=5),
            st.booleans(),
            st.integers(min_value=2**31),
            st.integers(max_value=-(2**31) - 1),
        ),
    ),
    st.tuples(
        st.sampled_from(("category", "session_id")),
        st.one_of(
            st.integers(),
            st.booleans(),
            st.just([]),
            st.text(min_size=MAX_ID_LENGTH + 1, max_size=MAX_ID_LENGTH + 5),
        ),
    ),
)


@given(valid_events(), _BREAKERS)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_every_malformed_field_is_rejected_with_a_reason_naming_it(obj, breaker):
    field, bad = breaker
    broken = dict(obj)
    if bad is None:
        broken.pop(field, None)
    else:
        broken[field] = bad
    with pytest.raises(InvalidEvent) as caught:
        validate(broken)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}:")
    raw = json.dumps(broken).encode()  # NaN/inf go through as the bare tokens json accepts
    with pytest.raises(InvalidEvent) as caught_raw:
        parse_event(raw)
    assert caught_raw.value.field == field


class _Str(str):
    pass


def _outcome_of(validator, obj):
    try:
        return validator(obj)
    except InvalidEvent as exc:
        return ("invalid", exc.field, str(exc))


@given(
    st.one_of(
        valid_events(),
        st.tuples(valid_events(), _BREAKERS).map(lambda pair: {**pair[0], pair[1][0]: pair[1][1]}),
        valid_events().map(lambda o: {**o, "user_id": _Str(o["user_id"])}),  # str subclass
        st.dictionaries(
            st.sampled_from(["event_id", "user_id", "item_id", "event_type", "ts", "price"]),
            st.one_of(st.integers(), st.text(max_size=5), st.none(), st.floats()),
        ),
    )
)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_the_fast_path_accepts_and_refuses_exactly_what_the_checked_path_does(obj):
    assert _outcome_of(validate, obj) == _outcome_of(_validate_checked, obj)


def test_a_validation_bug_dead_letters_the_record_instead_of_stopping_the_consumer(monkeypatch):
    import recstack.events as events

    def broken(obj):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(events, "validate", broken)
    good = b'{"event_id":"e","user_id":"u","item_id":"i","event_type":"view","ts":1}'
    # the batch path, the value-by-value path (a non-ASCII value in the batch) and the single parser
    for values in ([good], [good, "é".encode()]):
        outcome = parse_events(values)[0]
        assert isinstance(outcome, InvalidEvent) and "ZeroDivisionError" in str(outcome)


@given(st.one_of(st.integers(), st.text(), st.lists(st.integers(), max_size=3), st.none(), st.booleans()))
def test_a_value_that_is_not_an_object_is_rejected(value):
    with pytest.raises(InvalidEvent) as caught:
        parse_event(json.dumps(value).encode())
    assert caught.value.field is None
    assert "object" in str(caught.value)


@given(st.binary(max_size=40))
def test_arbitrary_bytes_never_crash_the_parser(raw):
    try:
        event = parse_event(raw)
    except InvalidEvent as exc:
        assert str(exc)
    else:
        assert isinstance(event, Event)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b"{not json", "not JSON"),
        (b"", "not JSON"),
        (None, "no value"),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_undecodable_values_have_a_reason(raw, needle):
    with pytest.raises(InvalidEvent) as caught:
        parse_event(raw)
    assert needle in str(caught.value)


# ------------------------------------------------------------------------------------ batch parser


def _outcome(raw):
    try:
        return parse_event(raw)
    except InvalidEvent as exc:
        return ("invalid", exc.field, str(exc))


def _batch_outcomes(values):
    return [
        parsed if isinstance(parsed, Event) else ("invalid", parsed.field, str(parsed))
        for parsed in parse_events(values)
    ]


fragments = st.one_of(
    valid_events().map(lambda o: json.dumps(o).encode()),
    valid_events().map(lambda o: json.dumps(o, ensure_ascii=False).encode()),
    valid_events().map(lambda o: (" \n" + json.dumps(o) + "\t ").encode()),
    st.sampled_from(
        [b"[1", b"2]", b"3,4", b"{", b"}", b",", b'"', b"\\", b"", b" ", b"\x0c{}", b"\xef\xbb\xbf{}"]
    ),
    st.binary(max_size=12),
    st.none(),
    st.text(max_size=12).map(str.encode),
)


@given(st.lists(fragments, max_size=12))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_batch_parser_agrees_with_the_single_parser(values):
    assert _batch_outcomes(values) == [_outcome(v) for v in values]


def test_batch_parser_is_not_fooled_by_values_that_only_parse_together():
    head = b'{"event_id":"e1","user_id":"u"'
    tail = b'"item_id":"i","event_type":"view","ts":1}'
    other = b'{"event_id":"e2","user_id":"u","item_id":"i","event_type":"view","ts":2},{"a":1}'
    values = [head, tail, other, b"[1", b"2]", b"3,4"]
    outcomes = _batch_outcomes(values)
    assert outcomes == [_outcome(v) for v in values]
    assert not any(isinstance(o, Event) for o in outcomes)


@given(st.lists(valid_events(), min_size=1, max_size=20))
def test_batch_parser_accepts_every_valid_event(objs):
    values = [json.dumps(o).encode() for o in objs]
    parsed = parse_events(values)
    assert all(isinstance(p, Event) for p in parsed)
    assert [p.event_id for p in parsed] == [o["event_id"] for o in objs]
