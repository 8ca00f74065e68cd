"""The pure attribution rule (services/attribution/rule.py) and the event contract's request_id."""

from __future__ import annotations

import json

import pytest

from recstack.events import Event, InvalidEvent, parse_event
from services.attribution.rule import (
    InvalidImpression,
    attribute,
    event_credits,
    offline_join,
    parse_impression,
)

T = 1_700_000_000_000
MIN = 60_000
WINDOW = 30 * MIN


def imp(rid, user, items, ts, arm="A", offset=0, shadow=None):
    value = {"request_id": rid, "user_id": user, "arm": arm, "model_version": "v1", "ts": ts}
    value["items"] = [{"item_id": it, "position": k, "score": 1.0} for k, it in enumerate(items, 1)]
    if shadow:
        value["shadow"] = {
            "version": "s1",
            "items": [{"item_id": it, "position": k} for k, it in enumerate(shadow, 1)],
        }
    return parse_impression(json.dumps(value), offset)


def ev(item, ts, kind="purchase", user="u1", request_id=None, price=None):
    return Event("e", user, item, kind, ts, price=price, request_id=request_id)


def test_request_id_is_optional_and_checked():
    base = {"event_id": "e1", "user_id": "u", "item_id": "i", "event_type": "view", "ts": T}
    assert parse_event(json.dumps(base)).request_id is None  # old events stay valid
    assert parse_event(json.dumps({**base, "request_id": "r-1"})).request_id == "r-1"
    assert (
        json.loads(parse_event(json.dumps({**base, "request_id": "r-1"})).to_json_bytes())["request_id"]
        == "r-1"
    )
    with pytest.raises(InvalidEvent) as bad:
        parse_event(json.dumps({**base, "request_id": 7}))
    assert bad.value.field == "request_id" and "string" in str(bad.value)
    with pytest.raises(InvalidEvent, match="request_id"):
        parse_event(json.dumps({**base, "request_id": "x" * 200}))


def test_latest_impression_holding_the_item_within_the_window():
    old, new, other = (
        imp("r1", "u1", ["a", "b"], T, offset=1),
        imp("r2", "u1", ["a"], T + MIN, offset=2),
        imp("r3", "u1", ["c"], T + 2 * MIN, offset=3),
    )
    imps = [old, new, other]
    assert attribute(ev("a", T + 5 * MIN), imps, WINDOW) is new  # latest holding the item
    assert attribute(ev("b", T + 5 * MIN), imps, WINDOW) is old  # the only one holding b
    assert attribute(ev("b", T + WINDOW), imps, WINDOW) is old  # the window is inclusive
    assert attribute(ev("b", T + WINDOW + 1), imps, WINDOW) is None
    assert attribute(ev("a", T + MIN + WINDOW + 1), imps, WINDOW) is None  # past the window
    assert attribute(ev("a", T + MIN - 1), imps, WINDOW) is old  # impressions after the event do not count
    assert attribute(ev("a", T - 1), imps, WINDOW) is None
    assert attribute(ev("a", T + 5 * MIN, user="u2"), imps, WINDOW) is None  # another user's


def test_ties_go_to_the_later_record():
    first, second = imp("r1", "u1", ["a"], T, offset=4), imp("r2", "u1", ["a"], T, offset=9)
    assert attribute(ev("a", T), [second, first], WINDOW) is second


def test_request_id_names_the_impression():
    imps = [imp("r1", "u1", ["a"], T, offset=1), imp("r2", "u1", ["a"], T + MIN, offset=2)]
    assert attribute(ev("a", T + 2 * MIN, request_id="r1"), imps, WINDOW) is imps[0]
    assert attribute(ev("a", T + 2 * MIN, request_id="nope"), imps, WINDOW) is None  # no fallback
    assert attribute(ev("a", T + WINDOW + 1, request_id="r1"), imps, WINDOW) is None


def test_credits_reciprocal_rank_revenue_and_shadow():
    shown = imp("r1", "u1", ["a", "b", "c"], T, arm="B", shadow=["c", "a"])
    credits = {(arm, name): n for _, arm, _, name, n in event_credits(ev("c", T + MIN, price=2.5), shown)}
    assert credits[("B", "purchase")] == 1
    assert credits[("B", "rr_micros_purchase")] == 333_333  # position 2
    assert credits[("B", "revenue_micros")] == 2_500_000
    assert credits[("shadow:s1", "rr_micros_purchase")] == 1_000_000  # first in the shadow's list
    assert credits[("shadow:s1", "live_rr_micros_purchase")] == 333_333


def test_invalid_impressions_are_named():
    with pytest.raises(InvalidImpression, match="ts"):
        parse_impression(json.dumps({"request_id": "r", "user_id": "u", "arm": "A", "items": []}))
    with pytest.raises(InvalidImpression, match=r"items\[0\].position"):
        parse_impression(
            json.dumps(
                {
                    "request_id": "r",
                    "user_id": "u",
                    "arm": "A",
                    "ts": 1,
                    "items": [{"item_id": "a", "position": 0}],
                }
            )
        )


def test_offline_join_counts_per_arm_and_minute():
    imps = [
        (
            0,
            0,
            json.dumps(
                {"request_id": "r1", "user_id": "u1", "arm": "A", "ts": T, "items": [{"item_id": "a"}]}
            ).encode(),
        )
    ]
    events = [
        (0, 0, ev("a", T + MIN, kind="add_to_cart").to_json_bytes()),
        (0, 1, b"not json"),
        (0, 2, ev("z", T + MIN).to_json_bytes()),  # not shown: not attributed
    ]
    out = offline_join(imps, events, WINDOW)
    assert out["default"]["A"]["totals"] == {
        "impressions": 1,
        "add_to_cart": 1,
        "rr_micros_add_to_cart": 1_000_000,
    }
    assert out["default"]["A"]["buckets"][T // MIN + 1] == {
        "add_to_cart": 1,
        "rr_micros_add_to_cart": 1_000_000,
    }


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"window_s": 0}, "--window"),
        ({"state_ttl_s": 60}, "--state-ttl"),
        ({"events_topic": "rank-impressions"}, "--events-topic"),
        ({"redis": "redis+cluster://127.0.0.1:7000"}, "not a cluster"),
    ],
)
def test_config_refuses_naming_the_flag(change, named):
    from recstack.errors import UserError
    from services.attribution.config import AttributionConfig

    with pytest.raises(UserError, match=named):
        AttributionConfig(**change)
