"""recstack.client without a server or a broker: the publisher's contract check, the channel
factory's refusals and its retry service config, the fallback's answer."""

from __future__ import annotations

import json

import grpc
import pytest

from recstack.client import FailedCall, RankingError, RetryPolicy, in_request_order
from recstack.client.channel import channel_arguments
from recstack.client.publisher import encode
from recstack.events import Event, InvalidEvent

GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "event_type": "view", "ts": 1_700_000_000_000}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"user_id": None}, "user_id"),
        ({"user_id": 17}, "user_id"),
        ({"item_id": ""}, "item_id"),
        ({"event_type": "click"}, "event_type"),
        ({"ts": "yesterday"}, "ts"),
        ({"price": -1.0}, "price"),
        ({"quantity": "2"}, "quantity"),
        ({"session_id": "x" * 200}, "session_id"),
    ],
)
def test_an_event_breaking_the_contract_is_refused_naming_the_field(change, field):
    event = {**GOOD, **change}
    event = {k: v for k, v in event.items() if v is not None}
    with pytest.raises(InvalidEvent) as err:
        encode(event)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")


def test_a_typed_event_is_checked_too_and_keyed_by_user():
    with pytest.raises(InvalidEvent, match="event_type"):
        encode(Event("e1", "u1", "i1", "click", 1))
    key, value = encode(Event("e1", "u7", "i1", "purchase", 5, price=2.5))
    assert key == b"u7"
    assert json.loads(value) == {
        "event_id": "e1", "user_id": "u7", "item_id": "i1", "event_type": "purchase", "ts": 5, "price": 2.5
    }  # fmt: skip


def test_a_token_without_tls_is_refused_beyond_loopback_and_local_on_loopback():
    with pytest.raises(ValueError, match="TLS"):
        channel_arguments("recstack.internal:50051", token="t")
    with pytest.raises(ValueError, match="empty"):
        channel_arguments("127.0.0.1:50051", token=" ")
    for target in ("127.0.0.1:50051", "localhost:1", "[::1]:50051"):
        credentials, _ = channel_arguments(target, token="t")
        assert credentials is not None
    assert channel_arguments("10.0.0.1:1", token="t", tls=True)[0] is not None
    assert channel_arguments("10.0.0.1:1")[0] is None  # no token: plaintext


def test_the_retry_policy_retries_unavailable_only_and_strict_turns_retries_off():
    _, options = channel_arguments("127.0.0.1:1")
    config = json.loads(dict(options)["grpc.service_config"])
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["methodConfig"][0]["name"] == [{"service": "recstack.v1.RankingService"}]
    _, options = channel_arguments("127.0.0.1:1", retries=None)
    assert "grpc.service_config" not in dict(options) and dict(options)["grpc.enable_retries"] == 0
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=9)


def test_in_request_order_keeps_the_callers_order_and_top_k():
    error = RankingError("Rank", grpc.StatusCode.UNAVAILABLE, "down")
    assert in_request_order(FailedCall("Rank", "u", ("c", "a", "b"), 2, error)) == ["c", "a"]
    assert in_request_order(FailedCall("Recommend", "u", (), 5, error)) == []


def test_an_address_list_is_loopback_only_when_every_address_is():
    assert channel_arguments("ipv4:127.0.0.1:50061,127.0.0.1:50062", token="t")[0] is not None
    with pytest.raises(ValueError, match="TLS"):
        channel_arguments("ipv4:127.0.0.1:50061,10.0.0.2:50062", token="t")
