"""The attribution consumer's Redis keys, in one place (the report and the tests read them too).

One attribution group per Redis database: every key lives under ``recstack:attr:``. The
script touches keys of many users and arms at once, so a Redis Cluster is not supported."""

from __future__ import annotations

PREFIX = "recstack:attr:"
OFFSETS = PREFIX + "offsets"  # hash: imp:<p> / ev:<p> -> last applied offset, wm:<p> -> watermark (ms)
OWNERS = PREFIX + "owners"  # hash: imp:<p> / ev:<p> -> owner token of the consumer applying it
ARMS = PREFIX + "arms"  # set of JSON [experiment, arm] seen


def impressions_field(partition: int) -> str:
    return f"imp:{partition}"


def events_field(partition: int) -> str:
    return f"ev:{partition}"


def watermark_field(partition: int) -> str:
    return f"wm:{partition}"


def user_key(user_id: str) -> str:
    """List of the user's latest impressions (compact JSON, newest first), bounded and expiring."""
    return f"{PREFIX}u:{user_id}"


def totals_key(experiment: str, arm: str) -> str:
    """Hash counter -> total for one arm."""
    return f"{PREFIX}m:{experiment}:{arm}"


def buckets_key(experiment: str, arm: str) -> str:
    """Hash ``<minute>:<counter>`` -> total in that minute of event time (epoch ms // 60,000)."""
    return f"{PREFIX}b:{experiment}:{arm}"
