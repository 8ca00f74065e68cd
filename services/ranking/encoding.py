"""RankResponse written straight to protobuf's wire format: no message object per item.

Building a response with the generated classes costs one ``ScoredItem`` per candidate (100 per
call) and a serialisation pass over them, all on the event loop's thread. Here each item id's
bytes up to its score (tags, lengths, the id) are made once and cached, the scores are packed in
one numpy call, and the response is one ``bytes.join`` over both: what ``SerializeToString``
would write (field order included), which any protobuf parser reads back as the same message.

:data:`ENCODED_FIELDS` names every field this encoder writes; a test compares it with the
generated descriptor, so a field added to the response must be added here too.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import numpy as np

# (message, field) pairs written below, checked against recstack/v1/ranking.proto by a test.
ENCODED_FIELDS = {
    ("RankResponse", "items"),
    ("RankResponse", "model_version"),
    ("RankResponse", "path"),
    ("RankResponse", "degraded"),
    ("RankResponse", "request_id"),
    ("RankResponse", "arm"),
    ("ScoredItem", "item_id"),
    ("ScoredItem", "score"),
}
_ITEMS = 0x0A  # RankResponse.items = 1, length-delimited
_VERSION = 0x12  # RankResponse.model_version = 2, length-delimited
_PATH = 0x1A  # RankResponse.path = 3, length-delimited
_DEGRADED = b"\x20\x01"  # RankResponse.degraded = 4, varint true (false is not written)
_REQUEST_ID = 0x2A  # RankResponse.request_id = 5, length-delimited
_ARM = 0x32  # RankResponse.arm = 6, length-delimited
_ITEM_ID = 0x0A  # ScoredItem.item_id = 1, length-delimited
_SCORE = 0x15  # ScoredItem.score = 2, fixed32
_CACHE_MAX = 500_000

_heads: dict[str, bytes] = {}  # item id -> its ScoredItem up to the score's 4 bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, value: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(value)) + value


def _head(item_id: str) -> bytes:
    raw = item_id.encode()
    inner = _field(_ITEM_ID, raw) + bytes((_SCORE,))
    head = bytes((_ITEMS,)) + _varint(len(inner) + 4) + inner
    if len(_heads) >= _CACHE_MAX:
        _heads.clear()
    _heads[item_id] = head
    return head


def ranked_order(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of the best ``top_k`` (0 = all) scores, best first; ties keep request order."""
    n = len(scores)
    if 0 < top_k < n:
        head = np.argpartition(-scores, top_k - 1)[:top_k]
        return head[np.argsort(-scores[head], kind="stable")]
    return np.argsort(-scores, kind="stable")


_id_prefix = os.urandom(8).hex()
_id_counter = itertools.count()


def new_request_id() -> str:
    """A fresh request id: 32 hex characters, unique across processes and restarts.

    A random 64-bit prefix drawn once per process, then a counter: 0.3 us a call against 3 us
    for ``uuid.uuid4().hex`` on this machine (docs/EXPERIMENTS.md), and it is made for every
    answer. ``next`` on an ``itertools.count`` is atomic under the GIL, so batch threads share it.
    """
    return f"{_id_prefix}{next(_id_counter):016x}"


def encode_response(
    candidates: Sequence[str],
    scores: np.ndarray,
    top_k: int,
    path: str,
    version: str,
    degraded: bool,
    request_id: str = "",
    arm: str = "",
) -> bytes:
    """The serialized RankResponse: the best ``top_k`` (0 = all) candidates, best first."""
    return encode_ranked(candidates, scores, top_k, path, version, degraded, request_id, arm)[0]


def encode_ranked(
    candidates: Sequence[str],
    scores: np.ndarray,
    top_k: int,
    path: str,
    version: str,
    degraded: bool,
    request_id: str = "",
    arm: str = "",
) -> tuple[bytes, list[str]]:
    """:func:`encode_response` and the item ids it wrote, best first (what an impression shows)."""
    order = ranked_order(scores, top_k)
    heads = _heads
    ids = [candidates[i] for i in order.tolist()]
    item_heads = [heads.get(i) or _head(i) for i in ids]
    packed = scores[order].astype("<f4").tobytes()
    score_bytes = [packed[j : j + 4] for j in range(0, len(packed), 4)]
    tail = _field(_VERSION, version.encode()) if version else b""
    if path:
        tail += _field(_PATH, path.encode())
    if degraded:
        tail += _DEGRADED
    if request_id:
        tail += _field(_REQUEST_ID, request_id.encode())
    if arm:
        tail += _field(_ARM, arm.encode())
    body = b"".join(
        itertools.chain(itertools.chain.from_iterable(zip(item_heads, score_bytes, strict=True)), (tail,))
    )
    return body, ids
