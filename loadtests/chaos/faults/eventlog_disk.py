"""Event-log disk faults: the consumers' event-log disk (a small tmpfs the run mounts) full or
remounted read-only. They need root to mount it; without it they are skipped."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from loadtests.chaos.faults import register
from loadtests.chaos.faults.base import LOG_ROLL_S, STREAM_CHECKS, Fault, FaultSpec, event_log_census

if TYPE_CHECKING:
    from loadtests.stats import StepRecord

WRITE_FAILURES = "recstack_stream_eventlog_write_failures_total"
_CHECKS = "consumers stop committing and say why; afterwards event log complete; " + STREAM_CHECKS


class _DiskFault(Fault):
    """The disk broken for ``hold_s``: the consumers must keep applying features, stop committing
    Kafka offsets, say why, and write every event once the disk is back."""

    needs = ("disk",)

    def break_disk(self) -> None:
        raise NotImplementedError

    def repair_disk(self) -> None:
        raise NotImplementedError

    def inject(self) -> None:
        run, result, hold_s = self.run, self.result, self.spec.hold_s
        assert run.state is not None and run.traffic is not None
        failures_before = run.scrape_sum(WRITE_FAILURES)
        log_sizes = [len(c.log_text()) for c in run.consumers]
        self.break_disk()
        try:
            time.sleep(LOG_ROLL_S + 1.0)  # a roll that began before the fault may still commit once
            committed_mid = run.state.committed()
            applied_mid = sum((run.state.applied() or {}).values())
            time.sleep(max(0.0, hold_s - LOG_ROLL_S - 1.0))
            committed_end = run.state.committed()
            applied_end = sum((run.state.applied() or {}).values())
        finally:
            self.repair_disk()
        result.check(
            "consumers stopped committing Kafka offsets",
            committed_mid is not None and committed_mid == committed_end,
            f"features kept flowing ({applied_end - applied_mid} more records applied); committed offsets "
            + (
                "unchanged" if committed_mid == committed_end else f"moved {committed_mid} -> {committed_end}"
            ),
        )
        failures = run.scrape_sum(WRITE_FAILURES) - failures_before
        said = [
            line.strip()
            for c, size in zip(run.consumers, log_sizes, strict=True)
            for line in c.log_text()[size:].splitlines()
            if "event log: writing" in line
        ]
        result.check(
            "consumers said why (log and metrics)",
            bool(said) and failures > 0,
            f"{failures:.0f} failed rolls counted; log: "
            + (said[0][said[0].index("event log:") :][:220] if said else "nothing"),
        )

    def check(self, record: StepRecord) -> None:
        census = event_log_census(self.run)
        self.result.figures["logged_twice"] = census.twice
        self.result.check(
            "after the disk is back, the event log holds every event",
            census.caught_up and census.missing == 0,
            census.detail(),
        )


@register
class EventLogFull(_DiskFault):
    spec = FaultSpec("eventlog-full", "event-log disk full", _CHECKS, hold_s=8.0)
    order = 100

    def break_disk(self) -> None:
        self.result.figures["filled_mb"] = round(self.run.disk.fill() / 2**20)

    def repair_disk(self) -> None:
        self.run.disk.free()


@register
class EventLogReadOnly(_DiskFault):
    spec = FaultSpec("eventlog-readonly", "event-log disk remounted read-only", _CHECKS, hold_s=8.0)
    order = 110

    def break_disk(self) -> None:
        self.run.disk.read_only()

    def repair_disk(self) -> None:
        self.run.disk.read_write()
