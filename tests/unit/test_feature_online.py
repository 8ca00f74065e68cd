"""Feast's Redis layout as ``feature_store.layout`` writes it, checked against Feast's own helpers,
and the Lua scripts of ``feature_store/lua`` as the package ships and fills them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

online = pytest.importorskip("feature_store.layout")

from feast.infra.online_stores.helpers import _mmh3, _redis_key  # noqa: E402
from feast.protos.feast.types.EntityKey_pb2 import EntityKey  # noqa: E402
from feast.protos.feast.types.Value_pb2 import Value  # noqa: E402

from feature_store import scripts  # noqa: E402
from feature_store.values import ItemFeatures, UserFeatures  # noqa: E402


@given(st.text(min_size=1, max_size=128))
@settings(max_examples=200)
def test_entity_keys_are_feasts(entity_id):
    for join_key, fast in (("user_id", online.user_key), ("item_id", online.item_key)):
        feast_key = _redis_key(
            "recstack", EntityKey(join_keys=[join_key], entity_values=[Value(string_val=entity_id)]), 3
        )
        assert fast(entity_id) == feast_key


def test_hash_fields_are_feasts():
    assert online.USER_FIELDS == [_mmh3(f"user_activity:{f}") for f in online.USER_FEATURES] + [
        b"_ts:user_activity"
    ]
    assert online.ITEM_FIELDS == [_mmh3(f"item_popularity:{f}") for f in online.ITEM_FEATURES] + [
        b"_ts:item_popularity"
    ]


user_features = st.builds(
    UserFeatures,
    views=st.integers(0, 2**40),
    add_to_carts=st.integers(0, 2**40),
    purchases=st.integers(0, 2**40),
    last_event_ts=st.integers(0, 2**45),
    recent_items=st.lists(st.text(max_size=20), max_size=50),
    purchased_items=st.lists(st.text(max_size=20), max_size=5),
    top_categories=st.lists(st.text(max_size=8), max_size=4),
    top_category_weights=st.lists(st.integers(0, 2**40), max_size=4),
    written_at_ms=st.integers(1, 2**42),
)


@given(user_features)
def test_user_encode_decode_round_trip(features):
    mapping = online.encode_user(features)
    decoded = online.decode_user([mapping.get(f) for f in online.USER_FIELDS])
    assert decoded == features


@given(
    st.builds(
        ItemFeatures,
        views=st.integers(0, 2**40),
        trending=st.floats(0, 1e6, width=32),
        last_event_ts=st.integers(0, 2**45),
        category=st.text(max_size=10),
        price=st.floats(0, 1e6, width=32),
        written_at_ms=st.integers(1, 2**42),
    )
)
def test_item_encode_decode_round_trip(features):
    mapping = online.encode_item(features)
    decoded = online.decode_item([mapping.get(f) for f in online.ITEM_FIELDS])
    assert decoded == features


def test_absent_hashes_decode_to_none_and_partial_ones_to_defaults():
    assert online.decode_user([None] * len(online.USER_FIELDS)) is None
    assert online.decode_item([None] * len(online.ITEM_FIELDS)) is None
    only_views = [Value(int64_val=4).SerializeToString()] + [None] * (len(online.USER_FIELDS) - 1)
    assert online.decode_user(only_views) == UserFeatures(views=4)


def test_decoded_lists_are_the_callers_own():
    mapping = online.encode_user(UserFeatures(recent_items=["a", "b"], written_at_ms=1))
    values = [mapping.get(f) for f in online.USER_FIELDS]
    first = online.decode_user(values)
    first.recent_items.append("mutated")
    assert online.decode_user(values).recent_items == ["a", "b"]


def test_the_merge_scripts_name_the_layout_of_this_module():
    for script in (scripts.MERGE_SCRIPT, scripts.CLUSTER_MERGE_SCRIPT):
        for field in online.USER_FIELDS + online.ITEM_FIELDS:
            assert "".join(f"\\{b:03d}" for b in field) in script
        assert "--#include" not in script and "--[[USER_FIELDS]]" not in script
    assert scripts.MERGE_SCRIPT.startswith("#!lua\n")
    for script in (scripts.CLUSTER_MERGE_SCRIPT, scripts.CLAIM_SCRIPT):
        assert script.startswith("#!lua flags=allow-cross-slot-keys\n")


def test_every_lua_file_is_package_data_and_used():
    """The scripts are read from the installed package: pyproject.toml must ship every .lua file,
    and every one of them must be used (a file nobody loads is a stale copy)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "lua/*.lua" in package_data["feature_store"]
    shipped = sorted(p.name for p in (root / "feature_store" / "lua").glob("*.lua"))
    used = {"codec.lua", "merge.lua", "cluster_merge.lua", "claim.lua", "raise.lua", "lower.lua"}
    assert shipped == sorted(used)
    for name in sorted(used - {"codec.lua"}):
        text = (root / "feature_store" / "lua" / name).read_text()
        body = text.replace("--#include codec.lua\n", "")
        assert body.strip().splitlines()[-1] in getattr(scripts, _script_name(name))


def _script_name(file_name: str) -> str:
    return file_name.removesuffix(".lua").upper() + "_SCRIPT"
