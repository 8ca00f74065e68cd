"""Fuzzing the ranking service's request handling without a network: arbitrary request bodies go
through the server's deserializer and validation, and come out as a query or as
INVALID_ARGUMENT naming a request field, never as another exception.

(tests/integration/test_fuzz_ranking_server.py sends the same kinds of bodies over a real channel.)
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recstack.v1 import ranking_pb2
from services.ranking.config import MAX_ID_LENGTH
from services.ranking.errors import InvalidArgument
from services.ranking.validation import (
    Query,
    Undecodable,
    tolerant_deserializer,
    validate_rank,
    validate_recommend,
)

MAX_CANDIDATES = 1_000
RANK_FIELDS = ("request", "user_id", "item_ids", "top_k")
RECOMMEND_FIELDS = ("request", "user_id", "k", "include_purchased")
parse_rank = tolerant_deserializer(ranking_pb2.RankRequest.FromString)
parse_recommend = tolerant_deserializer(ranking_pb2.RecommendRequest.FromString)


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append(0x80 | (n & 0x7F))
        n >>= 7


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


ids = st.one_of(
    st.text(max_size=MAX_ID_LENGTH + 2).map(str.encode),
    st.binary(max_size=8),  # often not UTF-8
    st.sampled_from([b"", b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"x" * (MAX_ID_LENGTH + 1)]),
)
integers = st.one_of(
    st.integers(-(2**63), 2**64 - 1), st.sampled_from([-1, 0, 1, 2**31 - 1, 2**31, -(2**31)])
)


@st.composite
def hand_made_bodies(draw, numbers: tuple[int, ...]) -> bytes:
    """Wire-format bodies assembled field by field: ids that are not UTF-8, huge or negative
    integers, fields repeated or unknown, and sometimes a cut or a stray byte at the end."""
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        number = draw(st.sampled_from(numbers))
        if draw(st.booleans()):
            parts.append(_field(number, draw(ids)))
        else:
            parts.append(_int_field(number, draw(integers)))
    body = b"".join(parts)
    tail = draw(st.sampled_from(["none", "cut", "junk"]))
    if tail == "cut" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif tail == "junk":
        body += draw(st.binary(min_size=1, max_size=4))
    return body


def _names_a_field(exc: InvalidArgument, fields: tuple[str, ...]) -> bool:
    return exc.field.split("[")[0] in fields and str(exc).startswith(f"{exc.field}: ")


def check_rank_body(body: bytes) -> Query | InvalidArgument:
    request = parse_rank(body)
    if isinstance(request, Undecodable):
        assert _names_a_field(request.error, RANK_FIELDS), request.error
    try:
        query = validate_rank(request, MAX_CANDIDATES)
    except InvalidArgument as exc:
        assert _names_a_field(exc, RANK_FIELDS), exc
        return exc
    assert query.user_id and 1 <= len(query.item_ids or ()) <= MAX_CANDIDATES and query.top_k >= 0
    assert all(1 <= len(i) <= MAX_ID_LENGTH for i in query.item_ids or ())
    return query


def check_recommend_body(body: bytes) -> Query | InvalidArgument:
    request = parse_recommend(body)
    try:
        query = validate_recommend(request, MAX_CANDIDATES, 10)
    except InvalidArgument as exc:
        assert _names_a_field(exc, RECOMMEND_FIELDS), exc
        return exc
    assert query.user_id and 1 <= query.top_k <= MAX_CANDIDATES
    return query


_FUZZ = settings(suppress_health_check=list(HealthCheck), deadline=None)


@_FUZZ
@given(st.one_of(st.binary(max_size=300), hand_made_bodies((1, 2, 3, 4, 15))))
def test_fuzz_rank_bodies(body):
    check_rank_body(body)


@_FUZZ
@given(st.one_of(st.binary(max_size=300), hand_made_bodies((1, 2, 3, 4, 15))))
def test_fuzz_recommend_bodies(body):
    check_recommend_body(body)


def test_bytes_that_are_not_utf8_name_their_field():
    body = _field(1, b"shopper") + _field(2, b"ok") + _field(2, b"\xff\xfe")
    outcome = check_rank_body(body)
    assert isinstance(outcome, InvalidArgument) and outcome.field == "item_ids[1]"
    outcome = check_rank_body(_field(1, b"\xc3"))
    assert isinstance(outcome, InvalidArgument) and outcome.field == "user_id"
    outcome = check_recommend_body(_field(1, b"\xed\xa0\x80"))
    assert isinstance(outcome, InvalidArgument) and outcome.field == "user_id"


def test_a_corrupt_body_is_a_bad_request():
    outcome = check_rank_body(b"\xff\xff\xff\xff")
    assert isinstance(outcome, InvalidArgument) and outcome.field == "request"
    assert "RankRequest" in str(outcome)


def test_a_huge_candidate_list_is_refused_by_count():
    request = ranking_pb2.RankRequest(user_id="u", item_ids=[str(i) for i in range(100_000)])
    outcome = check_rank_body(request.SerializeToString())
    assert isinstance(outcome, InvalidArgument) and outcome.field == "item_ids"
    assert "100000" in str(outcome)
