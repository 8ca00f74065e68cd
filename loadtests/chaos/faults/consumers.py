"""Stream consumer faults: one of the two consumers of the group killed, or hung past its session."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

from loadtests.chaos.faults import register
from loadtests.chaos.faults.base import (
    SESSION_TIMEOUT_MS,
    STREAM_CHECKS,
    Fault,
    FaultSpec,
    last_assignment,
    sleep_until,
)
from loadtests.chaos.stack import scrape

if TYPE_CHECKING:
    from loadtests.stats import StepRecord

REPLAYED = "recstack_stream_events_replayed_total"


@register
class ConsumerKill(Fault):
    spec = FaultSpec(
        "consumer-kill",
        "stream consumer SIGKILLed mid-batch, restarted at once",
        f"{STREAM_CHECKS}, lag back to 0",
        hold_s=1.0,
    )
    order = 10

    def inject(self) -> None:
        run = self.run
        assert run.state is not None
        victim = run.consumers[0]
        self.replayed = scrape(run.consumer_metrics[1], REPLAYED) or 0.0  # the survivor's
        applied = sum((run.state.applied() or {}).values())
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        self.result.figures["killed_at_records"] = f"{applied:,}"
        victim.start()  # as a supervisor would, at once
        self.restarted = time.monotonic()

    def check(self, record: StepRecord) -> None:
        run = self.run
        # Applied but not yet committed when the kill landed: read again, stopped by the fence
        # (the restarted process counts from zero; its metrics may not be up yet).
        again = run.scrape_sum(REPLAYED) - self.replayed
        self.result.figures["re_read_and_fenced"] = max(0, int(again))
        if "consumer-hang" not in run.remaining:
            return  # no later fault needs the group whole again: no need to wait for the rejoin
        # Both consumers hold partitions again before the next fault (it needs two).
        joined = run.wait_consumers_assigned(120.0)
        self.result.check(
            "the restarted consumer rejoined the group",
            joined,
            f"holds partitions {time.monotonic() - self.restarted:.0f} s after its restart"
            if joined
            else "not yet",
        )


@register
class ConsumerHang(Fault):
    spec = FaultSpec(
        "consumer-hang",
        "stream consumer SIGSTOPped past its session timeout, then SIGCONT",
        f"the other consumer takes its partitions over; {STREAM_CHECKS}",
        hold_s=12.0,
    )
    order = 20

    def inject(self) -> None:
        run, result, hold_s = self.run, self.result, self.spec.hold_s
        assert run.traffic is not None and run.state is not None
        victim = run.consumers[0]
        held = last_assignment(victim.log_text())
        victim.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        result.check("the stopped consumer held partitions", held, "its last assignment was not empty")
        try:
            # Records published once the session has surely expired must be applied by the other one.
            sleep_until(stopped + SESSION_TIMEOUT_MS / 1000 + 1.0)
            target = run.traffic.last_offsets()
            remaining = stopped + hold_s - time.monotonic()
            took = run.state.wait_applied(target, max(remaining, 1.0))
            result.check(
                "the other consumer took every partition over while this one hung",
                took is not None,
                "applied everything published after the session timeout"
                if took is not None
                else f"records stayed unapplied for {hold_s:.0f} s",
            )
            sleep_until(stopped + hold_s)
        finally:
            victim.signal(signal.SIGCONT)
        result.figures["stopped_s"] = round(time.monotonic() - stopped, 1)
