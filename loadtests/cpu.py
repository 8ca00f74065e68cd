"""CPU time of a process tree from /proc: what one benchmark step cost the server and the generator.

A snapshot holds, for every process of the tree (a root and all its descendants, so a server's
worker processes count), two readings of its CPU time:

* ``/proc/PID/stat`` utime + stime + cutime + cstime, in clock ticks (``SC_CLK_TCK``, 10 ms on
  Linux): the whole thread group, threads that have exited included, plus children it has reaped;
* the sum of ``/proc/PID/task/TID/schedstat``'s first field over its live threads, in ns.

The ns figure is preferred: at 25 calls/s a step's CPU time is a few hundred ms, and a tick is
10 ms per reading. It is used when the step kept every process and every thread it started with,
and when it agrees with the tick figure within their rounding (a thread that started and exited
inside the step is seen by the ticks only). Otherwise the tick figure is used, summed over the
tree so that a child reaped during the step moves its time into its parent's cutime, not away.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class ProcessCpu:
    """One process's CPU time: ``ticks`` from its stat line, ``thread_ns`` per live thread."""

    ticks: int
    thread_ns: dict[int, int] = field(default_factory=dict)  # empty: no schedstat on this kernel


@dataclass(frozen=True)
class CpuSnapshot:
    """The CPU time of every process of a tree at one moment."""

    processes: dict[int, ProcessCpu]

    def ticks(self) -> int:
        return sum(p.ticks for p in self.processes.values())


@dataclass(frozen=True)
class CpuDelta:
    """CPU seconds a tree spent between two snapshots, and which reading gave the figure."""

    seconds: float
    source: str  # "schedstat" (ns) or "stat" (clock ticks)
    processes: int


class ProcReader:
    """Reads /proc (or a copy of its layout under ``root``, for tests)."""

    def __init__(self, root: str | Path = "/proc", clock_ticks: int | None = None) -> None:
        self.root = Path(root)
        self.clock_ticks = clock_ticks or os.sysconf("SC_CLK_TCK")

    def _stat_fields(self, pid: int) -> list[str] | None:
        try:
            text = (self.root / str(pid) / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        # The command name is in parentheses and may hold spaces or ')'; fields follow the last ')'.
        # After it: field 3 (state) is index 0, ppid 1, utime 11, stime 12, cutime 13, cstime 14.
        return text[text.rindex(")") + 2 :].split()

    def tree(self, root_pid: int) -> list[int]:
        """``root_pid`` and its descendants that are alive now (root first)."""
        parents: dict[int, list[int]] = {}
        for entry in self.root.iterdir():
            if not entry.name.isdigit():
                continue
            fields = self._stat_fields(int(entry.name))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
        out, todo = [], [root_pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(sorted(parents.get(pid, ())))
        return out

    def process(self, pid: int) -> ProcessCpu | None:
        fields = self._stat_fields(pid)
        if fields is None:
            return None
        ticks = sum(int(x) for x in fields[11:15])
        thread_ns: dict[int, int] = {}
        try:
            for task in (self.root / str(pid) / "task").iterdir():
                try:
                    thread_ns[int(task.name)] = int((task / "schedstat").read_text().split()[0])
                except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                    continue  # the thread exited while we looked: the ticks still hold its time
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            thread_ns = {}
        return ProcessCpu(ticks=ticks, thread_ns=thread_ns)

    def snapshot(self, root_pids: list[int]) -> CpuSnapshot:
        """Every live process of the trees rooted at ``root_pids``."""
        processes: dict[int, ProcessCpu] = {}
        for root_pid in root_pids:
            for pid in self.tree(root_pid) if (self.root / str(root_pid)).exists() else []:
                reading = self.process(pid)
                if reading is not None:
                    processes[pid] = reading
        return CpuSnapshot(processes)

    def delta(self, start: CpuSnapshot, end: CpuSnapshot) -> CpuDelta:
        """CPU seconds spent between ``start`` and ``end`` (see the module docstring for the rule)."""
        tick_s = 1.0 / self.clock_ticks
        by_ticks = (end.ticks() - start.ticks()) * tick_s
        kept = set(start.processes) <= set(end.processes)
        ns = 0
        for pid, before in start.processes.items() if kept else ():
            after = end.processes[pid]
            if not before.thread_ns or not set(before.thread_ns) <= set(after.thread_ns):
                kept = False  # no schedstat here, or a thread exited: only the ticks saw all of it
                break
            ns += sum(t - before.thread_ns.get(tid, 0) for tid, t in after.thread_ns.items())
        if kept:
            # New processes started during the step: all of their time is the step's.
            ns += sum(
                sum(p.thread_ns.values()) for pid, p in end.processes.items() if pid not in start.processes
            )
            by_ns = ns / NS_PER_S
            # A stat reading truncates utime and stime to whole ticks, so two readings may differ
            # from the ns figure by two ticks per process; beyond that, the ticks saw time that
            # the live threads no longer hold (a thread that came and went during the step).
            tolerance = 3 * tick_s * max(len(end.processes), 1)
            if by_ticks - by_ns <= tolerance:
                return CpuDelta(seconds=by_ns, source="schedstat", processes=len(end.processes))
        return CpuDelta(seconds=max(by_ticks, 0.0), source="stat", processes=len(end.processes))


class CpuMeter:
    """The CPU time of a fixed set of process trees, read around each step."""

    def __init__(self, root_pids: list[int], reader: ProcReader | None = None) -> None:
        self.root_pids = list(root_pids)
        self.reader = reader or ProcReader()

    def snapshot(self) -> CpuSnapshot:
        return self.reader.snapshot(self.root_pids)

    def since(self, start: CpuSnapshot) -> CpuDelta:
        return self.reader.delta(start, self.snapshot())


def available(root: str | Path = "/proc") -> bool:
    """True where /proc reports process CPU time (Linux)."""
    return (Path(root) / "self" / "stat").is_file()
