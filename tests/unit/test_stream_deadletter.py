"""The dead-letter rules without a broker: far-future events, what a dead letter carries, and what
happens when the DLQ topic refuses one (a fake producer stands in for Kafka; the real broker is
in tests/integration/test_stream_dead_letters.py)."""

from __future__ import annotations

import hashlib

import kafka.errors as kafka_errors
import pytest

from recstack.cli import build_parser
from recstack.errors import UserError
from recstack.events import Event, InvalidEvent, refuse_future_events
from services.stream.config import StreamConfig
from services.stream.deadletter import DeadLetters, Letter
from services.stream.metrics import StreamMetrics

NOW_MS = 1_800_000_000_000
SKEW_MS = 300_000


def _event(ts_ms: int) -> Event:
    return Event("e", "u", "i", "view", ts_ms)


# ------------------------------------------------------------------------- far-future events


def test_an_event_exactly_at_the_skew_is_accepted_and_one_millisecond_more_is_refused():
    parsed = [_event(NOW_MS + SKEW_MS), _event(NOW_MS + SKEW_MS + 1), _event(NOW_MS - 10**9)]
    assert refuse_future_events(parsed, NOW_MS, SKEW_MS) == 1
    assert parsed[0] == _event(NOW_MS + SKEW_MS) and parsed[2] == _event(NOW_MS - 10**9)
    refused = parsed[1]
    assert isinstance(refused, InvalidEvent) and refused.field == "ts"
    assert str(refused).startswith("ts: 2027-01-15T08:05:00.001Z is 300 s ahead")
    assert "300 s allowed (--max-future-skew)" in str(refused)


def test_the_year_9999_is_refused_and_invalid_records_are_left_as_they_are():
    broken = InvalidEvent("user_id", "required field is missing")
    parsed = [broken, _event(253_402_214_400_000)]
    assert refuse_future_events(parsed, NOW_MS, SKEW_MS) == 1
    assert parsed[0] is broken
    assert str(parsed[1]).startswith("ts: 9999-12-31T00:00:00.000Z is ")


@pytest.mark.parametrize(
    ("env", "flag", "seconds"),
    [
        (None, None, 300.0),
        ("90", None, 90.0),
        ("5m", None, 300.0),
        ("1h", "250ms", 0.25),
        (None, "2m", 120.0),
    ],
)
def test_max_future_skew_from_flag_or_environment(monkeypatch, env, flag, seconds):
    if env is not None:
        monkeypatch.setenv("RECSTACK_MAX_FUTURE_SKEW", env)
    argv = ["stream"] + (["--max-future-skew", flag] if flag else [])
    assert StreamConfig.from_namespace(build_parser().parse_args(argv)).max_future_skew == seconds


@pytest.mark.parametrize("text", ["0", "-5m", "soon", "5 minutes", "nan"])
def test_a_bad_max_future_skew_is_refused_naming_the_flag(capsys, text):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stream", "--max-future-skew", text])
    assert "--max-future-skew" in capsys.readouterr().err


def test_a_bad_max_future_skew_in_the_config_is_refused():
    with pytest.raises(UserError, match="--max-future-skew"):
        StreamConfig(max_future_skew=0.0)


# ------------------------------------------------------------------------- dead letters


class _Future:
    def __init__(self, error: Exception | None) -> None:
        self._error = error

    def get(self, timeout: float | None = None) -> None:
        if self._error is not None:
            raise self._error


class FakeProducer:
    """Refuses what ``refuse(value, headers)`` names (an exception to raise at send, or
    ``("ack", exc)`` to fail the acknowledgement); keeps what it accepted."""

    def __init__(self, refuse=lambda value, headers: None) -> None:
        self.refuse = refuse
        self.accepted: list[tuple[bytes | None, bytes, dict[str, str]]] = []
        self.attempts = 0

    def send(self, topic, key=None, value=None, headers=None):
        self.attempts += 1
        verdict = self.refuse(value, headers)
        if isinstance(verdict, tuple):
            return _Future(verdict[1])
        if verdict is not None:
            raise verdict
        self.accepted.append((key, value, {k: v.decode() for k, v in headers}))
        return _Future(None)

    def flush(self, timeout=None) -> None:
        pass


def _size(value: bytes, headers) -> int:
    return len(value) + sum(len(k) + len(v) for k, v in headers)


def _letters(*marks: tuple[int, int], value: bytes = b"{broken") -> list[Letter]:
    return [Letter(p, o, b"key", value, "value is not JSON: Expecting value") for p, o in marks]


def _sender(producer, max_request_bytes: int = 1024 * 1024) -> tuple[DeadLetters, StreamMetrics]:
    metrics = StreamMetrics()
    return DeadLetters(producer, StreamConfig(), metrics, max_request_bytes), metrics


def test_a_dead_letter_carries_the_reason_the_source_and_the_size_and_digest_of_the_record():
    producer = FakeProducer()
    sender, _ = _sender(producer)
    assert sender.send(_letters((2, 17))) == {}
    ((key, value, headers),) = producer.accepted
    assert (key, value) == (b"key", b"{broken")
    assert headers == {
        "error": "value is not JSON: Expecting value",
        "source-topic": "user-events",
        "source-partition": "2",
        "source-offset": "17",
        "original-size": "7",
        "original-sha256": hashlib.sha256(b"{broken").hexdigest(),
    }


def test_a_record_with_neither_key_nor_value_gets_a_dead_letter_with_an_empty_value():
    producer = FakeProducer()
    sender, _ = _sender(producer)
    assert sender.send([Letter(0, 3, None, None, "message has no value")]) == {}
    ((key, value, headers),) = producer.accepted
    assert (key, value, headers["original-size"]) == (None, b"", "0")


@pytest.mark.parametrize("where", ["at send (the producer's limit)", "at the acknowledgement (the topic's)"])
def test_a_dead_letter_too_large_is_sent_truncated_accounting_for_the_whole_record(where):
    limit = 3_000
    big = b"[" + b"1," * 10_000

    def refuse(value, headers):
        if _size(value, headers) <= limit:
            return None
        error = kafka_errors.MessageSizeTooLargeError("too large")
        return error if where.startswith("at send") else ("ack", error)

    producer = FakeProducer(refuse)
    sender, metrics = _sender(producer, max_request_bytes=limit)
    assert sender.send(_letters((0, 5), value=big)) == {}
    ((_, value, headers),) = producer.accepted
    assert 0 < len(value) < len(big) and big.startswith(value)
    assert headers["original-size"] == str(len(big))
    assert headers["original-sha256"] == hashlib.sha256(big).hexdigest()
    assert headers["error"] == "value is not JSON: Expecting value"
    assert f"value cut to {len(value)} of {len(big)} bytes" in headers["truncated"]
    assert "MessageSizeTooLargeError" in headers["truncated"]
    assert metrics.dlq_truncated._value.get() == 1
    assert metrics.dlq_send_failures._value.get() >= 1


def test_a_topic_refusing_even_an_empty_letter_holds_the_partition_after_bounded_attempts():
    producer = FakeProducer(
        lambda value, headers: ("ack", kafka_errors.MessageSizeTooLargeError("too large"))
    )
    sender, metrics = _sender(producer)
    held = sender.send(_letters((1, 9), value=b"x" * 500_000))
    assert list(held) == [1] and held[1][0] == 9 and "MessageSizeTooLargeError" in held[1][1]
    assert producer.accepted == []
    assert producer.attempts <= 12  # the whole letter, then a value cut by 4 each time down to none
    assert metrics.dlq_send_failures._value.get() == producer.attempts


def test_a_missing_topic_holds_every_partition_at_its_first_letter_without_truncating():
    timeout = kafka_errors.KafkaTimeoutError("Failed to update metadata after 5.0 secs.")
    producer = FakeProducer(lambda value, headers: timeout)
    sender, metrics = _sender(producer)
    held = sender.send(_letters((0, 4), (0, 8), (3, 2)))
    assert {p: offset for p, (offset, _) in held.items()} == {0: 4, 3: 2}
    assert producer.attempts == 1  # the topic is missing: the other letters are not tried
    assert metrics.dlq_truncated._value.get() == 0


def test_a_transient_refusal_holds_without_truncating_and_a_letter_sent_past_it_is_not_sent_again():
    replicas = kafka_errors.NotEnoughReplicasError()
    failing = {b"first"}
    producer = FakeProducer(lambda value, headers: ("ack", replicas) if value in failing else None)
    sender, _ = _sender(producer)
    letters = [Letter(0, 4, None, b"first", "bad"), Letter(0, 6, None, b"second", "bad")]
    assert {p: o for p, (o, _) in sender.send(letters).items()} == {0: 4}
    assert [value for _, value, _ in producer.accepted] == [b"second"]
    failing.clear()  # the partition is read again from offset 4: both letters come back
    assert sender.send(letters) == {}
    assert [value for _, value, _ in producer.accepted] == [b"second", b"first"]
