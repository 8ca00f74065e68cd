"""The Kafka broker restarted under traffic, through ``infra/kafka.sh`` as an operator would."""

from __future__ import annotations

import time

from loadtests.chaos.faults import register
from loadtests.chaos.faults.base import EXPERIMENT_CHECKS, STREAM_CHECKS, Fault, FaultSpec


@register
class BrokerRestart(Fault):
    spec = FaultSpec(
        "broker-restart",
        "Kafka broker restarted (infra/kafka.sh restart)",
        f"{STREAM_CHECKS}; no publish lost; ranking errors only as allowed; {EXPERIMENT_CHECKS}",
        hold_s=15.0,
    )
    order = 30
    needs = ("kafka",)
    checks_experiment = True

    def inject(self) -> None:
        started = time.monotonic()
        self.run.infra.restart("kafka")
        self.result.figures["restart_s"] = round(time.monotonic() - started, 1)
        self.run.deprioritize_broker()  # the new broker process starts at the normal priority
