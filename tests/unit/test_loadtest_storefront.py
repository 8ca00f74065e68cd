"""``loadtests.storefront.drive`` with a fake server and a fake publisher (pure logic).

The real server and broker are in tests/integration/test_storefront_driver.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest

from loadtests.storefront import drive, request_id_of
from recstack.client import Ranking, RankingError
from recstack.events import validate
from recstack.experiments.simulate import Storefront, StorefrontConfig


@dataclass
class Answer:
    item_ids: list[str]
    request_id: str


def _shop() -> Storefront:
    return Storefront(StorefrontConfig(n_users=50, n_items=40), seed=5)


def test_events_follow_the_answer_and_carry_its_request_id():
    shop = _shop()
    asked: list[tuple[str, list[str], int]] = []
    sent: list[dict] = []

    def rank(user: str, page: list[str], k: int) -> Answer:
        asked.append((user, page, k))
        return Answer(list(reversed(page))[:k], f"req-{len(asked)}")

    result = drive(shop, rank, sent.append, 300, candidates=20, seed=1, run_id="t", progress=False)
    assert result.impressions == 300 and result.with_request_id == 300 and result.failed == 0
    assert all(k == 10 and len(set(page)) == 20 for _, page, k in asked)
    assert sum(result.events.values()) == len(sent) > 0
    carts = {event["session_id"] for event in sent if event["event_type"] == "add_to_cart"}
    buys = {event["session_id"] for event in sent if event["event_type"] == "purchase"}
    assert (result.carted, result.purchased) == (len(carts), len(buys))
    for event in sent:
        checked = validate(event)  # the contract's JSON object
        n = int(event["session_id"].split("-")[1])
        user, page, _ = asked[n]
        position = int(event["event_id"].split("-")[3])
        assert checked.user_id == user and event["request_id"] == f"req-{n + 1}"
        assert checked.item_id == list(reversed(page))[position - 1]  # the item shown there
    assert result.views_by_position[0] > result.views_by_position[-1]  # position bias
    assert result.acted_utility > result.shown_utility  # users view what they prefer
    assert result.preferred_view_rate > result.other_view_rate


def test_answers_without_a_request_id_and_failed_calls():
    shop = _shop()
    sent: list[dict] = []
    calls = 0

    def rank(user: str, page: list[str], k: int) -> Ranking:
        nonlocal calls
        calls += 1
        if calls % 4 == 0:
            raise RankingError("Rank", grpc.StatusCode.UNAVAILABLE, "down")
        return Ranking.from_proto(_reply(page[:k]))

    result = drive(shop, rank, sent.append, 100, candidates=10, seed=2, run_id="t", progress=False)
    assert result.impressions == 75 and result.failed == 25 and result.with_request_id == 0
    assert sent and not any("request_id" in event for event in sent)
    assert request_id_of(object()) == ""


def _reply(items: list[str]):
    from recstack.v1 import ranking_pb2

    return ranking_pb2.RankResponse(items=[ranking_pb2.ScoredItem(item_id=i, score=1.0) for i in items])


def test_a_page_larger_than_the_catalogue_is_refused():
    with pytest.raises(ValueError, match="candidates"):
        drive(_shop(), lambda *a: None, print, 1, candidates=41, progress=False)


def test_train_reads_the_storefront_history_as_a_named_source():
    """``recstack train --events synthetic-storefront``: the model of an experiment's arm A is
    trained on the history the storefront's users browsed (``--synthetic-events`` of them)."""
    from models.retrain import load_events
    from recstack.experiments.simulate import storefront_events

    events = load_events(["synthetic-storefront"], synthetic_events=3_000, seed=4)
    assert events.equals(storefront_events(3_000, seed=4))
