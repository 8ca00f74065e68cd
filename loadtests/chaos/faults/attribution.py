"""Attribution consumer faults: one of the two ``recstack attribute`` consumers SIGKILLed mid-stream."""

from __future__ import annotations

import signal

from loadtests.chaos.faults import register
from loadtests.chaos.faults.base import EXPERIMENT_CHECKS, STREAM_CHECKS, Fault, FaultSpec, last_assignment


@register
class AttributionKill(Fault):
    spec = FaultSpec(
        "attribution-kill",
        "attribution consumer SIGKILLed mid-stream, restarted at once",
        f"{EXPERIMENT_CHECKS} (exactly once: nothing lost, nothing counted twice); {STREAM_CHECKS}",
        hold_s=1.0,
    )
    order = 15
    checks_experiment = True

    def inject(self) -> None:
        victim = self.run.exp.consumers[0]
        # Mid-stream: it held partitions (its log's last assignment, as for the stream consumers).
        held = last_assignment(victim.log_text())
        self.result.check(
            "the killed attribution consumer held partitions", held, "its last assignment was not empty"
        )
        victim.signal(signal.SIGKILL)
        code = victim.wait(10)
        self.result.figures["killed_exit"] = code
        victim.start()  # as a supervisor would, at once
