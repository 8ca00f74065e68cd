"""The Redis keys of the stream consumer, in one place: the dedup keys of applied event ids, the
partitions' applied and logged offsets (the fences) and the event log's owner tokens and rolls.
Benchmarks, load tests and tests import them from here to read what the consumer stored."""

from __future__ import annotations

import hashlib

SEEN_PREFIX = b"recstack:eid:"


def seen_key(event_id: str) -> bytes:
    """The dedup key of an event id (a 128-bit digest keeps keys short whatever the id's length)."""
    return SEEN_PREFIX + hashlib.blake2b(event_id.encode(), digest_size=16).digest()


def applied_key(topic: str) -> str:
    """Hash partition -> last offset applied to the features."""
    return f"recstack:stream:{topic}:applied"


def logged_key(topic: str) -> str:
    """Hash partition -> last offset whose events are in rolled event-log files."""
    return f"recstack:stream:{topic}:logged"


def log_owners_key(topic: str) -> str:
    """Hash partition -> token of the consumer whose rolls may log that partition's events
    (hash-tagged with the logged key: one slot on a Redis Cluster, so one script sees both)."""
    return "{" + logged_key(topic) + "}:owners"


def log_rolls_key(topic: str) -> str:
    """Hash part-file name -> 1: rolls recorded as part of the log whose files may still wait
    under their temporary names (removed once renamed into place)."""
    return "{" + logged_key(topic) + "}:rolls"
