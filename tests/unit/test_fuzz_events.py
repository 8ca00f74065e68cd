"""Fuzzing the event validator with hostile bytes (the property tests of test_events.py cover
well-formed shapes; these cover what an attacker or a broken producer sends).

Property, for any input: ``parse_event`` returns a valid :class:`Event` that can be written
back out (UTF-8 JSON, Redis keys) and reads back equal, or raises :class:`InvalidEvent` whose
field is one of the contract's (or None for the whole record) and whose reason names it and
fits in a Kafka header. Never another exception. ``parse_events`` agrees value by value.

How many examples each test tries comes from the Hypothesis profile: ``ci`` (the default,
seconds) or ``long`` (``RECSTACK_FUZZ_PROFILE=long``); ``make fuzz`` runs them for a set time
(tests/fuzz/run.py), and with atheris.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recstack.events import (
    COLUMNS,
    EVENT_TYPES,
    MAX_ID_LENGTH,
    Event,
    InvalidEvent,
    parse_event,
    parse_events,
)

MAX_REASON_CHARS = 500  # the DLQ `error` header and a log line stay small whatever the input


def check_value(raw: bytes | None) -> Event | InvalidEvent:
    """The fuzz property for one Kafka value; returns the outcome (for batch comparisons)."""
    try:
        event = parse_event(raw)  # type: ignore[arg-type]
    except InvalidEvent as exc:
        reason = str(exc)
        assert exc.field is None or exc.field in COLUMNS, exc.field
        if exc.field is not None:
            assert reason.startswith(f"{exc.field}: "), reason
        assert 0 < len(reason) <= MAX_REASON_CHARS, reason[:200]
        reason.encode("utf-8")  # becomes a Kafka header
        return exc
    assert isinstance(event, Event)
    for text in (event.event_id, event.user_id, event.item_id, event.category, event.session_id):
        if text is not None:
            text.encode("utf-8")  # Redis keys, the Kafka key, the event log
    assert 1 <= len(event.event_id) <= MAX_ID_LENGTH and event.event_type in EVENT_TYPES
    assert parse_event(event.to_json_bytes()) == event
    return event


def _key(outcome: Event | InvalidEvent) -> object:
    return outcome if isinstance(outcome, Event) else ("invalid", outcome.field, str(outcome))


def check_batch(values: list[bytes | None]) -> None:
    expected = [_key(check_value(v)) for v in values]
    assert [_key(o) for o in parse_events(values)] == expected


# ------------------------------------------------------------------------------- strategies
def _event(**fields: object) -> dict:
    base: dict[str, object] = {
        "event_id": "e-1",
        "user_id": "u-1",
        "item_id": "i-1",
        "event_type": "view",
        "ts": 1_700_000_000_000,
    }
    base.update(fields)
    return base


VALID = json.dumps(_event(price=2.5, quantity=3, category="c", session_id="s")).encode()
_FIELDS = [*COLUMNS, "extra"]
# Values that are hostile as JSON text: spliced in raw, so they need not be valid JSON.
_RAW_VALUES = st.one_of(
    st.sampled_from(
        [
            b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1e-999", b"-0", b"0.0",
            b"9" * 5000,  # past Python's 4,300-digit int limit
            b"-" + b"9" * 400, b"1" * 30, b"true", b"null", b"[]", b"{}", b'""',
            b'"\\ud800"', b'"a\\udfff"', b'"\\ud83d\\ude00"', b'"\\u0000"',
            b'"' + b"x" * 129 + b'"', b'"2024-01-01T00:00:00Z"', b'"9999-12-31T23:59:59.999+00:00"',
            b'"\xff"', b'"\xc0\xaf"', b'"\xed\xa0\x80"', b'"\xe2\x82"',  # bytes that are not UTF-8
            b"[" * 3000 + b"]" * 3000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
        ]
    ),
    st.integers().map(lambda n: str(n).encode()),
    st.floats().map(lambda x: json.dumps(x).encode()),
    st.text(max_size=200).map(lambda t: json.dumps(t, ensure_ascii=False).encode()),
    st.binary(max_size=20),
)  # fmt: skip


@st.composite
def spliced_events(draw) -> bytes:
    """An event whose fields are replaced by hostile JSON text, possibly twice (duplicate keys)."""
    obj = _event()
    parts = [f'"{k}":{json.dumps(v)}'.encode() for k, v in obj.items()]
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(_FIELDS))
        entry = b'"' + name.encode() + b'":' + draw(_RAW_VALUES)
        if draw(st.booleans()):
            parts.append(entry)  # a duplicate key: the last one wins
        else:
            parts.insert(draw(st.integers(0, len(parts))), entry)
    return b"{" + b",".join(parts) + b"}"


@st.composite
def mutated_events(draw) -> bytes:
    """A valid event with bytes flipped, cut, inserted or repeated."""
    data = bytearray(draw(st.sampled_from([VALID, json.dumps(_event(user_id="é☃")).encode()])))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 16))] * draw(st.integers(1, 50))
    return bytes(data)


hostile_values = st.one_of(
    st.binary(max_size=200),
    spliced_events(),
    mutated_events(),
    _RAW_VALUES,
    st.none(),
)

_FUZZ = settings(suppress_health_check=list(HealthCheck), deadline=None)


# ----------------------------------------------------------------------------------- fuzzers
@_FUZZ
@given(hostile_values)
def test_fuzz_one_value(raw):
    check_value(raw)


@_FUZZ
@given(st.lists(hostile_values, max_size=8))
def test_fuzz_a_batch(values):
    check_batch(values)


@_FUZZ
@given(st.sampled_from(["event_id", "user_id", "item_id", "category", "session_id"]), st.text(max_size=5))
def test_a_lone_surrogate_in_any_text_field_is_refused_naming_it(field, prefix):
    raw = json.dumps(_event(**{field: prefix + "\ud800"})).encode()  # json.dumps writes \\ud800
    outcome = check_value(raw)
    assert isinstance(outcome, InvalidEvent) and outcome.field == field
    check_batch([raw, VALID])


# ----------------------------------------------------------------- named hostile inputs (once)
@pytest.mark.parametrize(
    ("raw", "field", "needle"),
    [
        (json.dumps(_event(user_id="x" * 10_000_000)).encode(), "user_id", "1-128"),  # a 10 MB id
        (b"[" * 1_000_000, None, "nested too deeply"),
        (b'{"a":' * 200_000 + b"1" + b"}" * 200_000, None, "nested too deeply"),
        (VALID[:-1] + b',"extra":' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nested too deeply"),
        (VALID.replace(b"1700000000000", b"9" * 5000), None, "not JSON"),  # int digit limit
        (VALID.replace(b"1700000000000", b"1e3"), "ts", "got float"),
        (VALID.replace(b"2.5", b"NaN"), "price", "finite"),
        (VALID.replace(b"2.5", b"Infinity"), "price", "finite"),
        (VALID.replace(b"2.5", b"1e999"), "price", "finite"),
        (VALID.replace(b'"view"', b'"\xff"'), None, "not UTF-8"),
        (VALID.replace(b'"view"', b'"\xed\xa0\x80"'), None, "not UTF-8"),  # a surrogate in UTF-8 form
        (VALID[:-1] + b',"event_type":"click"}', "event_type", "click"),  # duplicate key: last wins
        (b"\xef\xbb\xbf" + VALID, None, "not JSON"),  # a byte-order mark
    ],
)
def test_named_hostile_inputs(raw, field, needle):
    outcome = check_value(raw)
    assert isinstance(outcome, InvalidEvent)
    assert outcome.field == field and needle in str(outcome), str(outcome)
    check_batch([VALID, raw, VALID])


def test_a_duplicate_key_takes_the_last_value():
    raw = b'{"event_type":"click",' + VALID[1:-1] + b"}"  # VALID's own event_type comes last
    event = check_value(raw)
    assert isinstance(event, Event) and event.event_type == "view"


def test_a_huge_batch_of_huge_values():
    """A 10 MB poll of mixed records: each gets its own outcome, in order."""
    big = json.dumps(_event(category="c" * 1_000_000)).encode()
    values = [VALID, big, None, b"\xff" * 1000, VALID] * 10
    check_batch(values)
