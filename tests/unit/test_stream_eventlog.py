"""The Parquet event log: date-partitioned part files, written whole or not at all."""

from __future__ import annotations

import os
import time

import pytest

from recstack.events import Event
from recstack.sources import load_event_log
from services.stream.eventlog import EventLog

DAY_MS = 86_400_000
MAY_1 = 1_714_521_600_000  # 2024-05-01T00:00:00Z


def _events(n: int, start_ms: int, step_ms: int = 60_000) -> list[Event]:
    return [
        Event(
            f"e{start_ms}-{i}",
            f"u{i % 3}",
            f"i{i % 5}",
            "view",
            start_ms + i * step_ms,
            price=1.5,
            category="c",
        )
        for i in range(n)
    ]


def test_roll_writes_one_file_per_event_date_readable_as_an_event_log(tmp_path):
    log = EventLog(tmp_path, roll_rows=1_000, roll_s=3600)
    events = _events(10, MAY_1 - 5 * 60_000)  # five before midnight, five after
    log.append(events)
    assert log.rows == 10 and not log.due()
    files = log.roll()
    assert log.rows == 0
    assert sorted(p.parent.name for p in files) == ["date=2024-04-30", "date=2024-05-01"]
    assert all(p.name.startswith("part-") and p.suffix == ".parquet" for p in files)
    assert not list(tmp_path.rglob("*.tmp"))
    frame = load_event_log([tmp_path])
    assert list(frame["event_id"]) == [e.event_id for e in events]
    assert list(frame["ts"]) == [e.ts_ms for e in events]
    assert frame["price"].tolist() == [1.5] * 10
    assert frame["session_id"].isna().all()


def test_due_by_rows_or_by_age(tmp_path):
    log = EventLog(tmp_path, roll_rows=3, roll_s=3600)
    log.append(_events(2, MAY_1))
    assert not log.due()
    log.append(_events(1, MAY_1 + DAY_MS))
    assert log.due()
    log.take()
    aged = EventLog(tmp_path, roll_rows=1_000, roll_s=0.01)
    time.sleep(0.02)
    assert aged.due()


def test_take_write_and_put_back(tmp_path):
    log = EventLog(tmp_path)
    first, second = _events(2, MAY_1), _events(2, MAY_1 + 1_000)
    log.append(first)
    taken = log.take()
    log.append(second)
    log.put_back(taken)  # as after a failed write: back to the front, in order
    assert log.rows == 4
    assert log.take()[0] == [e.event_id for e in first + second]
    assert log.write(log.take()) == []  # nothing buffered, nothing written


def _crash(log: EventLog) -> None:
    """What a killed process leaves: its lock released (the kernel closes the file), files as they are."""
    os.close(log._lock_fd)
    log._lock_fd = None


def test_leftovers_of_a_stopped_writer_are_published_if_recorded_and_removed_otherwise(tmp_path):
    gone, alive = EventLog(tmp_path), EventLog(tmp_path)
    recorded = gone.stage(_columns(gone, _events(3, MAY_1)))
    unrecorded = gone.stage(_columns(gone, _events(2, MAY_1 + 1_000)))
    in_progress = alive.stage(_columns(alive, _events(2, MAY_1 + 2_000)))
    assert not list(tmp_path.rglob("*.parquet"))  # staged files are invisible to readers
    _crash(gone)
    asked = []

    def committed(names):
        asked.append(sorted(names))
        return {recorded[0].name}

    resolver = EventLog(tmp_path)
    published, removed = resolver.resolve_leftovers(committed)
    assert asked == [
        sorted([recorded[0].name, unrecorded[0].name])
    ]  # the live writer's file is not asked about
    assert published == [recorded[0].final] and removed == [unrecorded[0].temporary]
    assert list(load_event_log([tmp_path])["event_id"]) == [e.event_id for e in _events(3, MAY_1)]
    assert in_progress[0].temporary.exists()
    assert not (tmp_path / f".writer-{gone._writer_id}.lock").exists()
    # the live writer finishes its roll; a clean close leaves no lock file behind
    alive.publish(in_progress)
    alive.close()
    resolver.close()
    assert not list(tmp_path.glob(".writer-*.lock"))


def test_leftovers_stay_when_redis_cannot_say(tmp_path):
    gone = EventLog(tmp_path)
    staged = gone.stage(_columns(gone, _events(2, MAY_1)))
    gone.close()  # a temporary is left: the lock file stays for the next start to find
    assert (tmp_path / f".writer-{gone._writer_id}.lock").exists()

    def redis_down(names):
        raise ConnectionError("Redis is down")

    try:
        EventLog(tmp_path).resolve_leftovers(redis_down)
    except ConnectionError:
        pass
    else:
        raise AssertionError("the error should reach the caller")
    assert staged[0].temporary.exists()
    assert EventLog(tmp_path).resolve_leftovers(lambda names: set()) == ([], [staged[0].temporary])


def test_drop_partitions_keeps_the_order_of_the_rest(tmp_path):
    log = EventLog(tmp_path)
    events = _events(6, MAY_1)
    log.append(events, [0, 1, 2, 0, 1, 2])
    assert log.drop_partitions({1}) == 2
    assert log.take()[0] == [events[i].event_id for i in (0, 2, 3, 5)]


def _columns(log: EventLog, events: list[Event]) -> list[list]:
    log.append(events, 0)
    return log.take()


def test_a_failed_write_leaves_no_file_behind_so_the_retry_logs_each_event_once(tmp_path):
    log = EventLog(tmp_path)
    events = _events(10, MAY_1 - 5 * 60_000)  # two dates: the first file is written, the second fails
    log.append(events)
    (tmp_path / "date=2024-05-01").write_bytes(b"")  # a file where the folder must go
    taken = log.take()
    try:
        log.write(taken)
    except OSError:
        pass
    else:
        raise AssertionError("the write should have failed")
    assert not list(tmp_path.rglob("*.parquet")) and not list(tmp_path.rglob("*.tmp"))
    log.put_back(taken)
    (tmp_path / "date=2024-05-01").unlink()  # the disk is back
    log.roll()
    assert list(load_event_log([tmp_path])["event_id"]) == [e.event_id for e in events]


def test_a_write_failing_mid_file_closes_and_removes_it(tmp_path, monkeypatch):
    import errno

    import services.stream.eventlog as eventlog

    handles = []

    def full_disk(table, where, **kwargs):  # what pyarrow does when the disk fills up mid-file
        handles.append(where)
        where.write(b"PAR1 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(eventlog.pq, "write_table", full_disk)
    log = EventLog(tmp_path)
    log.append(_events(3, MAY_1))
    try:
        log.roll()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    else:
        raise AssertionError("the write should have failed")
    # closed at once (not when the exception is collected): a full disk gets its space back and
    # a read-only remount is not kept busy
    assert handles and handles[0].closed
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.parquet"))


def test_the_writer_lock_is_held_read_only_so_the_disk_can_be_remounted_read_only(tmp_path):
    log = EventLog(tmp_path)
    assert log._lock_fd is not None
    flags = int(
        next(
            line.split()[1]
            for line in open(f"/proc/self/fdinfo/{log._lock_fd}")  # noqa: SIM115
            if line.startswith("flags:")
        ),
        8,
    )
    assert flags & os.O_ACCMODE == os.O_RDONLY
    log.close()


def test_a_writer_started_on_a_failing_disk_takes_its_lock_at_its_first_roll(tmp_path, monkeypatch):
    import errno

    real_open = os.open

    def read_only_disk(path, flags, *args):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only_disk)
    log = EventLog(tmp_path, roll_rows=1_000, roll_s=3600)  # starts: the features need no log
    assert log._lock_fd is None
    log.append(_events(3, MAY_1))
    taken = log.take()
    with pytest.raises(OSError) as refused:  # a roll without the writer's lock must fail
        log.write(taken)
    assert refused.value.errno == errno.EROFS
    log.put_back(taken)
    assert not list(tmp_path.rglob("*.parquet*"))  # nothing staged without the lock
    monkeypatch.setattr(os, "open", real_open)  # the disk is back
    files = log.roll()
    assert log._lock_fd is not None and len(files) == 1
    assert list(load_event_log([tmp_path])["event_id"]) == [e.event_id for e in _events(3, MAY_1)]
    log.close()
