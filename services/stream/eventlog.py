"""The event log for retraining: applied events as Parquet files, one folder per event date.

``DIR/date=YYYY-MM-DD/part-<time>-<writer>-<n>.parquet`` with the columns of
:data:`recstack.events.COLUMNS` (``ts`` in epoch milliseconds). Events are buffered in memory and
written when the buffer is rolled: each file is written under a hidden temporary name, flushed to
disk and renamed, so a reader never sees a partial file. What makes the log complete after a
crash (re-reading from the last rolled offset) is in ``services/stream/consumer.py``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recstack.events import Event

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("ts", pa.int64()),
        ("price", pa.float64()),
        ("quantity", pa.int64()),
        ("category", pa.string()),
        ("session_id", pa.string()),
    ]
)
_DAY_MS = 86_400_000
_STALE_TEMP_S = 3600.0


class EventLog:
    """Buffer of applied events, written out as Parquet part files when rolled.

    :meth:`append` and :meth:`take` belong to the consumer's loop; :meth:`write` may run on
    another thread (one at a time), so a roll does not stall the stream.
    """

    def __init__(self, directory: str | Path, roll_rows: int = 200_000, roll_s: float = 30.0) -> None:
        self.directory = Path(directory)
        self.roll_rows = roll_rows
        self.roll_s = roll_s
        self._writer_id = uuid.uuid4().hex[:8]
        self._seq = 0
        # Columns rather than Event objects: nine lists are nine objects for the garbage collector
        # to track, whatever the number of buffered events (a full collection over 200,000 events
        # would pause the stream for tenths of a second).
        self._buffer: list[list] = _empty_columns()
        self._opened = time.monotonic()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

    @property
    def rows(self) -> int:
        """Events buffered and not yet taken for a file."""
        return len(self._buffer[0])

    def append(self, events: list[Event]) -> None:
        if not events:
            return
        (event_id, user_id, item_id, event_type, ts, price, quantity, category, session_id) = self._buffer
        event_id.extend([e.event_id for e in events])
        user_id.extend([e.user_id for e in events])
        item_id.extend([e.item_id for e in events])
        event_type.extend([e.event_type for e in events])
        ts.extend([e.ts_ms for e in events])
        price.extend([e.price for e in events])
        quantity.extend([e.quantity for e in events])
        category.extend([e.category for e in events])
        session_id.extend([e.session_id for e in events])

    def due(self) -> bool:
        """True once the buffer is big or old enough to be rolled."""
        return self.rows >= self.roll_rows or time.monotonic() - self._opened >= self.roll_s

    def take(self) -> list[list]:
        """Empty the buffer and return what it held (columns, for :meth:`write`)."""
        columns, self._buffer = self._buffer, _empty_columns()
        self._opened = time.monotonic()
        return columns

    def put_back(self, columns: list[list]) -> None:
        """Return taken columns whose :meth:`write` failed to the front of the buffer."""
        for taken, buffered in zip(columns, self._buffer, strict=True):
            buffered[:0] = taken

    def write(self, columns: list[list]) -> list[Path]:
        """Write taken columns to new part files, one per event date, durably; return their paths."""
        if not columns[0]:
            return []
        table = pa.Table.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA, strict=True)], schema=SCHEMA
        )
        days = pc.floor(pc.divide(table.column("ts"), _DAY_MS))
        written: list[Path] = []
        try:
            for day in sorted(set(days.to_pylist())):
                written.append(self._write(int(day), table.filter(pc.equal(days, day))))
        except OSError:
            # All or nothing: the caller puts every taken event back and writes them again later,
            # so the files of the days already written would otherwise hold them twice.
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return written

    def roll(self) -> list[Path]:
        """Write the whole buffer now (on the calling thread)."""
        return self.write(self.take())

    def _write(self, day: int, table: pa.Table) -> Path:
        date = datetime.fromtimestamp(day * 86_400, tz=UTC).strftime("%Y-%m-%d")
        folder = self.directory / f"date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%S")
        name = f"part-{stamp}-{self._writer_id}-{self._seq:06d}.parquet"
        temporary = folder / f".{name}.tmp"
        try:
            # Our own handle, closed whatever happens: a failed write_table keeps its file open
            # until the exception is garbage collected, holding the space of a full disk and
            # keeping a read-only remount busy.
            with open(temporary, "wb") as fh:
                pq.write_table(table, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            temporary.unlink(missing_ok=True)  # a disk that filled up mid-file gets its space back
            raise
        final = folder / name
        os.replace(temporary, final)
        _fsync_dir(folder)
        log.debug("event log: %d rows -> %s", table.num_rows, final)
        return final

    def _remove_stale_temporaries(self) -> None:
        # Left by a writer that crashed mid-roll; its events are re-read from Kafka and logged again.
        cutoff = time.time() - _STALE_TEMP_S
        for path in self.directory.glob("date=*/.part-*.parquet.tmp"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                pass


def _empty_columns() -> list[list]:
    return [[] for _ in SCHEMA]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
