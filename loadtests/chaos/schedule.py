"""The faults ``recstack chaos`` knows, in the order it injects them, and how long each one runs.

Each fault gets one window of steady ranking traffic: ``pre_s`` of normal service (the baseline),
the fault itself (``hold_s``: how long it is held, or about how long the restart takes), then
``post_s`` to recover. Events flow through the same window; afterwards the stream drains and the
checks run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from recstack.errors import UserError


@dataclass(frozen=True, slots=True)
class FaultSpec:
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


_STREAM = "features = truth (none lost or applied twice), DLQ = malformed sent"
FAULTS: tuple[FaultSpec, ...] = (
    FaultSpec(
        "consumer-kill",
        "stream consumer SIGKILLed mid-batch, restarted at once",
        f"{_STREAM}, lag back to 0",
        hold_s=1.0,
    ),
    FaultSpec(
        "consumer-hang",
        "stream consumer SIGSTOPped past its session timeout, then SIGCONT",
        f"the other consumer takes its partitions over; {_STREAM}",
        hold_s=12.0,
    ),
    FaultSpec(
        "broker-restart",
        "Kafka broker restarted (infra/kafka.sh restart)",
        f"{_STREAM}; no publish lost; ranking errors only as allowed",
        hold_s=15.0,
    ),
    FaultSpec(
        "redis-restart",
        "Redis restarted (infra/redis.sh restart)",
        f"{_STREAM}; ranking errors only as the contract allows",
        hold_s=2.0,
    ),
    FaultSpec(
        "redis-lose-writes",
        "Redis loses acknowledged writes: AOF switched off, SIGKILL, restart from the stale AOF",
        f"writes lost counted; the consumers apply them again; {_STREAM}; event log exactly once",
        hold_s=5.0,
    ),
    FaultSpec(
        "redis-slow",
        "Redis stalls 50 ms of every 100 ms (CLIENT PAUSE)",
        f"ranking answers (degraded allowed), errors only as allowed; {_STREAM}",
        hold_s=8.0,
    ),
    FaultSpec(
        "server-term",
        "ranking server 1 of 2 SIGTERMed under load, restarted",
        "no call fails while it drains and stops; it comes back; " + _STREAM,
        hold_s=16.0,  # until the replacement is SERVING: a start-up loads and warms the model
    ),
    FaultSpec(
        "server-kill",
        "ranking server 1 of 2 SIGKILLed under load, restarted",
        "UNAVAILABLE only for calls in flight at the kill; service continues; " + _STREAM,
        hold_s=16.0,
    ),
    FaultSpec(
        "model-corrupt",
        "corrupted model versions published (bad checksum; good checksum, broken weights)",
        "both refused, the old version keeps serving; ranking errors only as allowed",
        hold_s=5.0,
    ),
    FaultSpec(
        "eventlog-full",
        "event-log disk full",
        "consumers stop committing and say why; afterwards event log complete; " + _STREAM,
        hold_s=8.0,
    ),
    FaultSpec(
        "eventlog-readonly",
        "event-log disk remounted read-only",
        "consumers stop committing and say why; afterwards event log complete; " + _STREAM,
        hold_s=8.0,
    ),
)
FAULT_NAMES = tuple(f.name for f in FAULTS)


def plan(names: list[str] | None = None, quick: bool = False) -> list[FaultSpec]:
    """The faults to inject, in the canonical order; ``quick`` shortens the quiet parts of each window.

    ``names`` None or empty means all of them; an unknown name is a :class:`UserError`.
    """
    wanted = list(dict.fromkeys(names or FAULT_NAMES))
    unknown = [n for n in wanted if n not in FAULT_NAMES]
    if unknown:
        raise UserError(f"--faults: unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULT_NAMES)}")
    chosen = [f for f in FAULTS if f.name in wanted]
    if quick:
        chosen = [replace(f, pre_s=2.0, post_s=6.0) for f in chosen]
    return chosen


def parse_fault_list(text: str) -> list[str]:
    """``"consumer-kill, redis-restart"`` -> names (``all`` or empty: every fault)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    return [] if names == ["all"] else names
