"""Prometheus metrics of the attribution consumer (served on :9466 by default).

Counters count what this process applied (each replica its partitions: sum them); the exact
totals, kept across restarts, are in Redis (:func:`services.attribution.store.read_arm_metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from recstack.metrics import in_process_values
from services.attribution.rule import MICROS, Credit

_ARM = ("experiment", "arm")


class AttributionMetrics:
    """The consumer's metrics, in their own registry (several consumers may share a test process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        with in_process_values():
            self.impressions = Counter(
                "recstack_attribution_impressions", "Impressions applied, per arm", _ARM, registry=r
            )
            self.actions = Counter(
                "recstack_attribution_actions",
                "Events credited to an impression of the arm",
                (*_ARM, "event_type"),
                registry=r,
            )
            self.reciprocal_rank = Counter(
                "recstack_attribution_reciprocal_rank",
                "Sum of 1/(position+1) of the items acted on (divide by actions for the mean)",
                (*_ARM, "event_type"),
                registry=r,
            )
            self.revenue = Counter(
                "recstack_attribution_revenue", "price x quantity of credited purchases", _ARM, registry=r
            )
            self.unattributed = Counter(
                "recstack_attribution_unattributed_events",
                "Valid events credited to no impression",
                ("reason",),
                registry=r,
            )
            self.invalid = Counter(
                "recstack_attribution_invalid_records", "Records skipped as invalid", ("topic",), registry=r
            )
            self.held = Gauge(
                "recstack_attribution_held_events",
                "Events waiting for the impressions to catch up",
                registry=r,
            )
            self.released_by_wait = Counter(
                "recstack_attribution_released_by_wait",
                "Events applied after --max-wait without the impressions reaching their ts",
                registry=r,
            )
            self.fence_rewinds = Counter(
                "recstack_attribution_fence_rewinds",
                "Partitions read again from the offsets in Redis (a refused batch or lost writes)",
                registry=r,
            )
            self.redis_retries = Counter(
                "recstack_attribution_redis_retries", "Redis calls retried", registry=r
            )

    def count(self, credits: list[Credit]) -> None:
        """Count an applied batch's credits."""
        for exp, arm, _, name, amount in credits:
            if name == "impressions":
                self.impressions.labels(exp, arm).inc(amount)
            elif name in ("view", "add_to_cart", "purchase"):
                self.actions.labels(exp, arm, name).inc(amount)
            elif name.startswith("rr_micros_"):
                self.reciprocal_rank.labels(exp, arm, name[len("rr_micros_") :]).inc(amount / MICROS)
            elif name == "revenue_micros":
                self.revenue.labels(exp, arm).inc(amount / MICROS)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
