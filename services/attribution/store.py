"""Reading the per-arm online metrics back from Redis (``recstack experiment report`` uses this),
turning totals into the rates the docs name, and the offline join of the raw topics as they
stand in Kafka (the chaos check compares the two)."""

from __future__ import annotations

import json
from typing import Any

from services.attribution import keys
from services.attribution.rule import MICROS, ArmMetrics, offline_join


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


def topic_records(bootstrap: str, topic: str, **client_options: Any) -> list[tuple[int, int, bytes | None]]:
    """Every record of ``topic`` up to its end offsets now, as ``(partition, offset, value)``."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **client_options)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        out = []
        while any(consumer.position(tp) < end[tp] for tp in tps):
            for tp, recs in consumer.poll(timeout_ms=500).items():
                out += [(tp.partition, r.offset, r.value) for r in recs if r.offset < end[tp]]
        return sorted(out)
    finally:
        consumer.close()


def offline_join_topics(
    bootstrap: str, impressions_topic: str, events_topic: str, window_ms: int, **client_options: Any
) -> ArmMetrics:
    """:func:`~services.attribution.rule.offline_join` of the two topics as they stand."""
    return offline_join(
        topic_records(bootstrap, impressions_topic, **client_options),
        topic_records(bootstrap, events_topic, **client_options),
        window_ms,
    )
