"""Returning shoppers: which users a benchmark keeps, from their features."""

from __future__ import annotations

import pytest

from feature_store.values import UserFeatures
from loadtests.shoppers import select_returning


def _user(recent: int) -> UserFeatures:
    return UserFeatures(views=recent, recent_items=[f"item{i}" for i in range(recent)])


def test_keeps_users_with_enough_recent_items() -> None:
    users = ["a", "b", "c", "d", "e"]
    features = [_user(20), _user(19), None, _user(50), _user(30)]
    chosen = select_returning(users, features, 20)
    assert chosen.users == ["a", "d", "e"]
    assert chosen.checked == 5 and chosen.min_recent_items == 20
    assert chosen.median_recent_items == 30.0
    assert chosen.summary() == {"users": 3, "checked": 5, "min_recent_items": 20, "median_recent_items": 30.0}


def test_no_returning_shopper_has_no_median() -> None:
    chosen = select_returning(["a", "b"], [None, _user(3)], 20)
    assert chosen.users == [] and chosen.median_recent_items is None


def test_users_and_features_must_align() -> None:
    with pytest.raises(ValueError, match="2 users but 1 feature rows"):
        select_returning(["a", "b"], [None], 20)
