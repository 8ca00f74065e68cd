"""Reading the per-arm online metrics back from Redis (``recstack experiment report`` uses this),
and turning totals into the rates the docs name."""

from __future__ import annotations

import json
from typing import Any

from services.attribution import keys
from services.attribution.rule import MICROS, ArmMetrics


def read_arm_metrics(client: Any, experiment: str | None = None) -> ArmMetrics:
    """experiment -> arm -> {"totals": {counter: n}, "buckets": {minute: {counter: n}}}, as the
    attribution consumer stored them (the same shape as :func:`~services.attribution.rule.offline_join`)."""
    arms = sorted(tuple(json.loads(m)) for m in client.smembers(keys.ARMS))
    arms = [(e, a) for e, a in arms if experiment is None or e == experiment]
    pipe = client.pipeline(transaction=True)  # one snapshot: totals and buckets agree
    for exp, arm in arms:
        pipe.hgetall(keys.totals_key(exp, arm))
        pipe.hgetall(keys.buckets_key(exp, arm))
    replies = pipe.execute() if arms else []
    out: ArmMetrics = {}
    for (exp, arm), totals, buckets in zip(arms, replies[::2], replies[1::2], strict=True):
        by_minute: dict[int, dict[str, int]] = {}
        for field, value in buckets.items():
            minute, _, name = (field.decode() if isinstance(field, bytes) else field).partition(":")
            by_minute.setdefault(int(minute), {})[name] = int(value)
        out.setdefault(exp, {})[arm] = {
            "totals": {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in totals.items()},
            "buckets": by_minute,
        }
    return out


def rates(totals: dict[str, int]) -> dict[str, float]:
    """Per-impression rates, mean reciprocal rank per action and revenue per impression."""
    n = totals.get("impressions", 0)
    out: dict[str, float] = {"impressions": float(n)}
    for kind in ("view", "add_to_cart", "purchase"):
        acted = totals.get(kind, 0)
        out[f"{kind}_rate"] = acted / n if n else 0.0
        out[f"mrr_{kind}"] = totals.get(f"rr_micros_{kind}", 0) / MICROS / acted if acted else 0.0
    out["revenue"] = totals.get("revenue_micros", 0) / MICROS
    out["revenue_per_impression"] = out["revenue"] / n if n else 0.0
    return out
