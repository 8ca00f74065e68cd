"""The Parquet event log: date-partitioned part files, written whole or not at all."""

from __future__ import annotations

import os
import time

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


def test_stale_temporaries_of_a_crashed_writer_are_removed(tmp_path):
    folder = tmp_path / "date=2024-05-01"
    folder.mkdir()
    stale, fresh = folder / ".part-old.parquet.tmp", folder / ".part-new.parquet.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"being written by another writer")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    EventLog(tmp_path)
    assert not stale.exists() and fresh.exists()


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
