"""What a fault is to the chaos run: its spec (name, table text, timings), its code (inject and heal,
then its own checks after the window), and the helpers the faults share.

A fault module imports only the standard library, this module and :mod:`loadtests.chaos.stack` at
its top (``recstack --help`` lists the faults, so loading them must stay cheap); heavier modules
(redis, the report's figures, the model artifacts) are imported inside the code that needs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from loadtests.chaos.report import FaultResult
    from loadtests.chaos.runner import ChaosRun
    from loadtests.stats import StepRecord

# The consumers' settings the faults time themselves by (the run starts the consumers with them).
SESSION_TIMEOUT_MS = 6_000  # the broker's minimum: a stopped consumer's partitions move soonest
LOG_ROLL_S = 2.0  # the event log is rolled this often
SERVING_TIMEOUT_S = 120.0  # a ranking server's start-up, up to SERVING
# Statuses a ranking client may see while a dependency misbehaves (docs/RELIABILITY.md, "The checks
# after every fault"): the server sheds (RESOURCE_EXHAUSTED) or the call's deadline passes;
# everything else is a failure unless the fault allows more (Fault.also_allowed).
ALLOWED_CODES = frozenset({"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})
# The stream's output is checked after every fault; the table's "what was checked" says so.
STREAM_CHECKS = "features = truth (none lost or applied twice), DLQ = malformed sent"
EXPERIMENT_CHECKS = "impressions published or counted dropped/failed, per-arm attributions = offline join"
# What a fault may need from the stack; without it the fault is skipped, with the reason.
NEEDS = ("kafka", "redis", "disk")  # a broker / Redis started by infra/ (pid file), the tmpfs log disk


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One fault's place in the schedule: ``pre_s`` of normal service (the baseline), the fault
    itself (``hold_s``: how long it is held, or about how long the restart takes), then ``post_s``
    to recover. Events flow through the same window; afterwards the stream drains and the checks run.
    """

    name: str
    title: str  # what happens, for the table
    checks: str  # what is checked, for the table
    hold_s: float
    pre_s: float = 4.0
    post_s: float = 12.0

    @property
    def window_s(self) -> float:
        """Length of the ranking traffic window around the fault."""
        return self.pre_s + self.hold_s + self.post_s


@dataclass
class Window:
    """One fault's window of traffic: its monotonic times and the result its checks fill in."""

    spec: FaultSpec
    result: FaultResult
    start: float = 0.0  # monotonic time the window's first call is scheduled at
    fault_start: float = 0.0
    fault_end: float = 0.0
    end: float = 0.0
    lag_recovery: list[float | None] = field(default_factory=list)
    allowed_codes: frozenset[str] = ALLOWED_CODES  # ranking statuses this fault may cause


class Fault:
    """A fault: a subclass with a ``spec``, an ``order`` and the code, registered with
    :func:`loadtests.chaos.faults.register`. The run makes one instance per window, so what
    :meth:`inject` measures (a count before the fault, the time of a kill) can wait on ``self``
    for :meth:`check`.

    The run around it is generic: it starts the window's traffic, calls :meth:`inject` ``pre_s``
    into it (``fault_start``), takes its return as the fault's end, and after the window runs the
    ranking checks, then :meth:`check` (only when :meth:`inject` did not raise), then the stream
    checks (features = truth, DLQ = malformed sent, lag back to 0).
    """

    spec: ClassVar[FaultSpec]
    order: ClassVar[int]  # place in the run: faults run in ascending order
    needs: ClassVar[tuple[str, ...]] = ()  # any of NEEDS; without one the fault is skipped
    also_allowed: ClassVar[frozenset[str]] = frozenset()  # ranking statuses allowed on top of ALLOWED_CODES
    # Also check impressions and attribution after this fault (they are always checked after the last).
    checks_experiment: ClassVar[bool] = False

    def __init__(self, run: ChaosRun, window: Window) -> None:
        self.run = run
        self.w = window

    @property
    def result(self) -> FaultResult:
        return self.w.result

    def inject(self) -> None:
        """Inject the fault, hold it for ``spec.hold_s`` (or until a restart is done) and heal it;
        checks that can only be made meanwhile go to :attr:`result` here."""
        raise NotImplementedError

    def check(self, record: StepRecord) -> None:
        """The fault's own checks after the window (``record``: every call of the window)."""


# ---------------------------------------------------------------------------------- shared helpers


def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def retry(call: Callable[[], Any], attempts: int = 20, delay_s: float = 0.5) -> Any:
    for i in range(attempts):
        try:
            return call()
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(delay_s)
    return None


def records_covered(applied: dict[int, int] | None) -> int:
    """Records the applied offsets cover (offset + 1 per partition)."""
    return sum(offset + 1 for offset in (applied or {}).values())


def last_assignment(log_text: str) -> bool:
    """True when the newest process's last 'assigned partitions [...]' line lists any partition."""
    newest = log_text.rsplit("===== ", 1)[-1]  # Service.start marks each start in the log
    lines = [line for line in newest.splitlines() if "assigned partitions [" in line]
    return bool(lines) and not lines[-1].rstrip().endswith("[]")


@dataclass(frozen=True, slots=True)
class LogCensus:
    """The event log against the distinct valid events acknowledged so far."""

    caught_up: bool  # the logged offsets reached every published record
    distinct: int
    missing: int
    twice: int  # events logged more than once

    def detail(self, twice_label: str = "logged twice", twice_before: int = 0) -> str:
        return (
            f"{self.distinct:,} distinct events, {self.missing} missing, "
            f"{self.twice - twice_before} {twice_label}"
            + ("" if self.caught_up else "; logged offsets did not catch up in 60 s")
        )


def event_log_census(run: ChaosRun, wait: bool = True) -> LogCensus:
    """Count the event log's events; with ``wait``, first wait (up to 60 s) for the logged offsets
    to reach every record published."""
    assert run.state is not None and run.traffic is not None
    caught_up = not wait or run.state.wait_logged(run.traffic.last_offsets(), 60.0) is not None
    ids = run.disk.event_ids()
    distinct = run.traffic.distinct_events()
    missing = len(distinct - set(ids))
    twice = sum(1 for e in distinct if ids.get(e, 0) > 1)
    return LogCensus(caught_up, len(distinct), missing, twice)
