"""CPU time per call from /proc: the reader on a fake /proc tree, and the per-step arithmetic."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from loadtests.cpu import CpuMeter, ProcReader, available
from loadtests.saturation import MeteredRunner, SearchConfig, measure
from loadtests.stats import StepRecord, cpu_ms_per_call, summarize_step

TICKS = 100  # clock ticks per second, as on Linux


class FakeProc:
    """A /proc layout under ``root``: ``stat`` lines and per-thread ``schedstat`` files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "self").mkdir(parents=True)
        (root / "self" / "stat").write_text("1 (self) S 0\n")

    def set(
        self,
        pid: int,
        ppid: int,
        utime: int,
        stime: int,
        threads: dict[int, int] | None = None,
        cutime: int = 0,
        cstime: int = 0,
        name: str = "python3 -m x (y)",
    ) -> None:
        """``threads``: thread id -> ns on CPU (None: a kernel without schedstat)."""
        folder = self.root / str(pid)
        (folder / "task").mkdir(parents=True, exist_ok=True)
        # Fields 3..: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime
        # stime cutime cstime priority ...; the name holds spaces and a ')' on purpose.
        rest = f"S {ppid} {pid} {pid} 0 -1 4194304 10 0 0 0 {utime} {stime} {cutime} {cstime} 20 0 3 0"
        (folder / "stat").write_text(f"{pid} ({name}) {rest}\n")
        for task in (folder / "task").iterdir():
            for f in task.iterdir():
                f.unlink()
            task.rmdir()
        for tid, ns in (threads or {}).items():
            (folder / "task" / str(tid)).mkdir()
            (folder / "task" / str(tid) / "schedstat").write_text(f"{ns} 12345 67\n")

    def remove(self, pid: int) -> None:
        folder = self.root / str(pid)
        for task in (folder / "task").iterdir():
            for f in task.iterdir():
                f.unlink()
            task.rmdir()
        (folder / "task").rmdir()
        (folder / "stat").unlink()
        folder.rmdir()


MS = 1_000_000  # ns


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def test_a_tree_is_the_root_and_all_its_descendants(proc: FakeProc) -> None:
    proc.set(100, 1, 0, 0)
    proc.set(101, 100, 0, 0)  # a worker
    proc.set(102, 101, 0, 0)  # the worker's child
    proc.set(200, 1, 0, 0)  # someone else
    assert sorted(ProcReader(proc.root, TICKS).tree(100)) == [100, 101, 102]


def test_schedstat_nanoseconds_summed_over_threads_and_processes(proc: FakeProc) -> None:
    reader = ProcReader(proc.root, TICKS)
    proc.set(100, 1, 10, 5, {100: 150 * MS, 110: 0})
    proc.set(101, 100, 2, 0, {101: 20 * MS})
    start = reader.snapshot([100])
    # 40 ms more on the main thread, 33 ms on a second thread, 12.5 ms in the worker, and a new
    # thread that did 4 ms: 89.5 ms, which the ticks (10 ms each) see as 80 ms.
    proc.set(100, 1, 16, 6, {100: 190 * MS, 110: 33 * MS, 111: 4 * MS})
    proc.set(101, 100, 3, 0, {101: 32_500_000})
    delta = reader.delta(start, reader.snapshot([100]))
    assert delta.source == "schedstat" and delta.processes == 2
    assert delta.seconds == pytest.approx(0.0895)


def test_ticks_when_a_thread_exited_during_the_step(proc: FakeProc) -> None:
    reader = ProcReader(proc.root, TICKS)
    proc.set(100, 1, 10, 5, {100: 150 * MS, 110: 50 * MS})
    start = reader.snapshot([100])
    proc.set(100, 1, 40, 10, {100: 300 * MS})  # thread 110 is gone; stat still counts its time
    delta = reader.delta(start, reader.snapshot([100]))
    assert delta.source == "stat"
    assert delta.seconds == pytest.approx(0.35)  # (40 + 10 - 10 - 5) ticks


def test_ticks_when_a_thread_came_and_went_inside_the_step(proc: FakeProc) -> None:
    reader = ProcReader(proc.root, TICKS)
    proc.set(100, 1, 10, 0, {100: 100 * MS})
    start = reader.snapshot([100])
    # The live thread did 10 ms, but stat saw 210 ms: a thread that lived only inside the step.
    proc.set(100, 1, 31, 0, {100: 110 * MS})
    delta = reader.delta(start, reader.snapshot([100]))
    assert delta.source == "stat" and delta.seconds == pytest.approx(0.21)


def test_ticks_with_reaped_children_when_a_worker_exited(proc: FakeProc) -> None:
    reader = ProcReader(proc.root, TICKS)
    proc.set(100, 1, 10, 0, {100: 100 * MS})
    proc.set(101, 100, 20, 0, {101: 200 * MS})
    start = reader.snapshot([100])
    # The worker used 30 more ticks and exited; its 50 ticks moved into the parent's cutime.
    proc.remove(101)
    proc.set(100, 1, 12, 0, {100: 120 * MS}, cutime=50)
    delta = reader.delta(start, reader.snapshot([100]))
    assert delta.source == "stat" and delta.seconds == pytest.approx(0.32)  # 2 + 30 ticks


def test_ticks_without_schedstat(proc: FakeProc) -> None:
    reader = ProcReader(proc.root, TICKS)
    proc.set(100, 1, 10, 5)
    start = reader.snapshot([100])
    proc.set(100, 1, 20, 7)
    delta = reader.delta(start, reader.snapshot([100]))
    assert delta.source == "stat" and delta.seconds == pytest.approx(0.12)


def test_a_gone_root_reads_as_nothing(proc: FakeProc) -> None:
    assert ProcReader(proc.root, TICKS).snapshot([999]).processes == {}


def test_cpu_per_call_arithmetic() -> None:
    assert cpu_ms_per_call(0.6, 500) == pytest.approx(1.2)
    assert cpu_ms_per_call(2.45, 1000) == pytest.approx(2.45)
    assert cpu_ms_per_call(0.1, 0) is None


class AdvancingRunner:
    """A step runner that, while "running" a step, makes the fake server and generator spend CPU."""

    def __init__(self, proc: FakeProc) -> None:
        self.proc = proc
        self.server_ns = 1_000 * MS
        self.generator_ns = 500 * MS

    def run_step(self, rate: float, duration_s: float, schedule: str = "", seed: int = 0) -> StepRecord:
        n = int(round(rate * duration_s))
        # The server: 1.2 ms a call on its main thread plus 0.3 ms a call in its worker process;
        # the generator: 0.5 ms a call. Two calls time out at the client: not completed.
        self.server_ns += int(n * 1.2 * MS)
        self.generator_ns += int(n * 0.5 * MS)
        self.proc.set(100, 1, self.server_ns // (10 * MS), 0, {100: self.server_ns})
        self.proc.set(101, 100, n * 3 // 100, 0, {101: int(n * 0.3 * MS)})
        self.proc.set(300, 1, self.generator_ns // (10 * MS), 0, {300: self.generator_ns})
        scheduled = np.arange(n) / rate + 50.0
        code = np.zeros(n, dtype=np.int16)
        code[:2] = 4  # DEADLINE_EXCEEDED at the client
        code[2:5] = 8  # RESOURCE_EXHAUSTED: answered by the server, so completed
        return StepRecord(
            scheduled=scheduled,
            sent=scheduled,
            done=scheduled + 0.001,
            code=code,
            path=np.where(code == 0, 0, -1).astype(np.int16),
            degraded=np.zeros(n, dtype=bool),
            path_names=["full"],
        )


def test_a_metered_step_reports_cpu_per_completed_call(proc: FakeProc) -> None:
    proc.set(100, 1, 100, 0, {100: 1_000 * MS})
    proc.set(101, 100, 0, 0, {101: 0})
    proc.set(300, 1, 50, 0, {300: 500 * MS})
    reader = ProcReader(proc.root, TICKS)
    runner = MeteredRunner(
        AdvancingRunner(proc), {"server": CpuMeter([100], reader), "generator": CpuMeter([300], reader)}
    )
    search = SearchConfig(rates=(25.0,), min_calls=500, step_s=1.0, warmup_s=0, cooldown_s=0)
    step = measure(runner, 25.0, "fixed", search, seed=0)
    assert step["scheduled"] == 500 and step["completed"] == 498  # 20 s at 25/s, minus 2 timeouts
    server, generator = step["cpu"]["server"], step["cpu"]["generator"]
    assert server["source"] == "schedstat" and generator["source"] == "schedstat"
    assert server["ms"] == pytest.approx(500 * 1.5)
    assert server["ms_per_call"] == pytest.approx(500 * 1.5 / 498, abs=1e-4)
    assert generator["ms_per_call"] == pytest.approx(500 * 0.5 / 498, abs=1e-4)


def test_a_step_without_cpu_readings_has_no_cpu_figures() -> None:
    record = StepRecord(
        scheduled=np.array([1.0]),
        sent=np.array([1.0]),
        done=np.array([1.001]),
        code=np.array([0], dtype=np.int16),
        path=np.array([0], dtype=np.int16),
        degraded=np.array([False]),
        path_names=["full"],
    )
    assert "cpu" not in summarize_step(record, offered_rate=1.0, duration_s=1.0)


@pytest.mark.skipif(not available(), reason="needs Linux /proc")
def test_the_real_proc_sees_this_process_spend_cpu() -> None:
    meter = CpuMeter([os.getpid()])
    start = meter.snapshot()
    for _ in range(10_000):  # busy work until this process has spent 50 ms (at most a few s)
        sum(range(10_000))
        if meter.since(start).seconds >= 0.05:
            break
    delta = meter.since(start)
    assert delta.seconds >= 0.05 and delta.processes >= 1
