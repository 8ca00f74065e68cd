"""The Redis Lua scripts of the online store, read from ``feature_store/lua/*.lua``.

The scripts are package data (``pyproject.toml``), read once at import; the writers register
them with redis-py (``register_script``) when they start, so each call is an ``EVALSHA``.
``merge.lua`` and ``cluster_merge.lua`` include ``codec.lua`` (the Feast value codec and the
merge rules both share) where they say ``--#include codec.lua``; its ``UF`` and ``IF`` tables
are filled here with the hash field names of :mod:`feature_store.layout`, so the scripts and the
Python side can never disagree on the layout.
"""

from __future__ import annotations

from importlib import resources

from feature_store.layout import ITEM_FIELDS, USER_FIELDS

_INCLUDE = "--#include codec.lua\n"


def _read(name: str) -> str:
    return resources.files("feature_store").joinpath("lua", name).read_text(encoding="utf-8")


def lua_bytes(raw: bytes) -> str:
    """``raw`` as a Lua string literal of decimal escapes (field names are arbitrary bytes)."""
    return '"' + "".join(f"\\{b:03d}" for b in raw) + '"'


def _codec() -> str:
    return (
        _read("codec.lua")
        .replace("--[[USER_FIELDS]]", ", ".join(lua_bytes(f) for f in USER_FIELDS))
        .replace("--[[ITEM_FIELDS]]", ", ".join(lua_bytes(f) for f in ITEM_FIELDS))
    )


def _with_codec(name: str) -> str:
    text = _read(name)
    if text.count(_INCLUDE) != 1:
        raise RuntimeError(f"feature_store/lua/{name}: expected one line {_INCLUDE.strip()!r}")
    return text.replace(_INCLUDE, _codec())


# One batch on a single server: offset fence, users unchanged since read, event-id dedup, merge.
MERGE_SCRIPT = _with_codec("merge.lua")
# One node's share of a batch on a Redis Cluster (feature_store.cluster).
CLUSTER_MERGE_SCRIPT = _with_codec("cluster_merge.lua")
# Claim event ids for the records carrying them, read other keys (Redis Cluster).
CLAIM_SCRIPT = _read("claim.lua")
# Raise / lower a hash's fields to given values, never the other way (the global applied offsets).
RAISE_SCRIPT = _read("raise.lua")
LOWER_SCRIPT = _read("lower.lua")
