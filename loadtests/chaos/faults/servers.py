"""Ranking server faults: server 1 of 2 stopped (SIGTERM) or killed (SIGKILL) under load, restarted."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

from loadtests.chaos.faults import register
from loadtests.chaos.faults.base import SERVING_TIMEOUT_S, STREAM_CHECKS, Fault, FaultSpec
from loadtests.chaos.stack import wait_serving

if TYPE_CHECKING:
    from loadtests.stats import StepRecord


class _ServerRestart(Fault):
    """Signal server 1, wait until it is gone (the other server carries the traffic), restart it as
    an orchestrator would and wait until it is SERVING again: the fault lasts until the service is
    whole again, so a start-up sharing the cores falls in the fault's figures and the recovery is
    counted from there."""

    sig: signal.Signals  # how the server is stopped

    def restart(self) -> None:
        w, result = self.w, self.result
        victim, port = self.run.servers[0], self.run.server_ports[0]
        victim.signal(self.sig)
        w.fault_start = time.monotonic()
        code = victim.wait(15)
        result.figures["exit_s"] = round(time.monotonic() - w.fault_start, 2)
        if code is None:
            victim.signal(signal.SIGKILL)
            victim.wait(10)
        victim.start()
        restarted = time.monotonic()
        ok = wait_serving(port, SERVING_TIMEOUT_S)
        result.figures["restart_serving_s"] = round(time.monotonic() - restarted, 1)
        result.check("the restarted server is SERVING again", ok, f"port {port}")


@register
class ServerTerm(_ServerRestart):
    spec = FaultSpec(
        "server-term",
        "ranking server 1 of 2 SIGTERMed under load, restarted",
        "no call fails while it drains and stops; it comes back; " + STREAM_CHECKS,
        hold_s=16.0,  # until the replacement is SERVING: a start-up loads and warms the model
    )
    order = 70
    sig = signal.SIGTERM

    def inject(self) -> None:
        victim = self.run.servers[0]
        before = victim.log_text()
        self.restart()
        stopped = "ranking server stopped" in victim.log_text()[len(before) :]
        self.result.check(
            "stopped gracefully",
            stopped,
            "its log says 'ranking server stopped'" if stopped else "no clean stop logged",
        )

    def check(self, record: StepRecord) -> None:
        from loadtests.chaos.report import window_stats

        w = self.w
        exited = w.fault_start + self.result.figures["exit_s"]
        # Calls sent from the SIGTERM until the server was gone: in flight on it, or refused by it
        # and sent to the other one. None may fail.
        stats = window_stats(record, w.fault_start - 1.0, exited + 0.5)
        self.result.check(
            "no call failed while the server drained and stopped",
            not stats["errors"],
            f"{stats['calls']} calls from 1 s before the SIGTERM to its exit, "
            f"errors {stats['errors'] or 'none'}",
        )


@register
class ServerKill(_ServerRestart):
    spec = FaultSpec(
        "server-kill",
        "ranking server 1 of 2 SIGKILLed under load, restarted",
        "UNAVAILABLE only for calls in flight at the kill; service continues; " + STREAM_CHECKS,
        hold_s=16.0,
    )
    order = 80
    sig = signal.SIGKILL
    also_allowed = frozenset({"UNAVAILABLE"})

    def inject(self) -> None:
        self.restart()

    def check(self, record: StepRecord) -> None:
        from loadtests.chaos.report import window_stats

        w, killed = self.w, self.w.fault_start
        failed = (record.code == 14) & (record.scheduled >= w.start)  # UNAVAILABLE
        late = failed & (record.sent > killed + 1.0)
        served = window_stats(record, killed, killed + 2.0)
        self.result.figures["unavailable"] = int(failed.sum())
        self.result.check(
            "UNAVAILABLE only for calls in flight at the kill (sent before it was seen, < 1 s)",
            int(late.sum()) == 0,
            f"{int(failed.sum())} UNAVAILABLE, {int(late.sum())} of them sent more than 1 s after the kill",
        )
        self.result.check(
            "service continued on the other server",
            served["ok"] > 0,
            f"{served['ok']} of {served['calls']} calls answered in the 2 s after the kill",
        )
