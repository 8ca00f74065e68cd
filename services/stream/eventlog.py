"""The event log for retraining: applied events as Parquet files, one folder per event date.

``DIR/date=YYYY-MM-DD/part-<time>-<writer>-<n>.parquet`` with the columns of
:data:`recstack.events.COLUMNS` (``ts`` in epoch milliseconds). Events are buffered in memory and
written when the buffer is rolled, in two steps: :meth:`EventLog.stage` writes each file under a
hidden temporary name (``.part-….parquet.tmp``) and flushes it to disk; :meth:`EventLog.publish`
renames it into place, so a reader never sees a partial file. Between the two the consumer
records in Redis that the roll is part of the log (``services/stream/fence.py``); a roll that
is refused there is discarded instead.

Each writer holds an exclusive ``flock`` on ``DIR/.writer-<id>.lock`` while it lives. Temporary
files of a writer whose lock nobody holds (it crashed mid-roll) are settled by
:meth:`EventLog.resolve_leftovers`: published if Redis says their roll went through, removed
otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
PARTITION = len(SCHEMA)  # the buffer's last column: each event's Kafka partition (not written)
_DAY_MS = 86_400_000
_TEMP_NAME = re.compile(r"^\.(part-\d{8}T\d{6}-(?P<writer>[0-9a-f]+)-\d+\.parquet)\.tmp$")


@dataclass(frozen=True, slots=True)
class Staged:
    """A part file written and flushed under its temporary name, not yet visible to readers."""

    temporary: Path
    final: Path

    @property
    def name(self) -> str:
        """The final file name: what Redis records for a roll that went through."""
        return self.final.name


class EventLog:
    """Buffer of applied events, written out as Parquet part files when rolled.

    :meth:`append` and :meth:`take` belong to the consumer's loop; :meth:`stage` and :meth:`write`
    may run on another thread (one at a time), so a roll does not stall the stream.
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
        # Held while this writer lives: its temporary files are its own business until then.
        self._lock_path = self.directory / f".writer-{self._writer_id}.lock"
        self._lock_fd: int | None = None
        try:
            self._take_lock()
        except OSError as exc:  # a full or read-only disk: the first roll tries again
            log.warning("event log: cannot create %s yet (%s); rolls wait for it", self._lock_path, exc)

    def _take_lock(self) -> None:
        if self._lock_fd is None:
            # Opened read-only (flock needs no more): a file open for writing would keep the
            # disk from being remounted read-only.
            fd = os.open(self._lock_path, os.O_RDONLY | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock_fd = fd

    @property
    def rows(self) -> int:
        """Events buffered and not yet taken for a file."""
        return len(self._buffer[0])

    def append(self, events: list[Event], partitions: list[int] | int = -1) -> None:
        """Buffer events; ``partitions`` is each event's Kafka partition (or one for all)."""
        if not events:
            return
        (event_id, user_id, item_id, event_type, ts, price, quantity, category, session_id, part) = (
            self._buffer
        )
        if isinstance(partitions, int):
            part.extend([partitions] * len(events))
        else:
            if len(partitions) != len(events):
                raise ValueError(f"{len(events)} events but {len(partitions)} partitions")
            part.extend(partitions)
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

    def postpone(self, seconds: float) -> None:
        """Make the next roll due in ``seconds`` (sooner than ``roll_s`` after a failed one)."""
        self._opened = time.monotonic() - self.roll_s + seconds

    def drop_partitions(self, partitions: Iterable[int]) -> int:
        """Remove the buffered events of these partitions; return how many there were."""
        before = self.rows
        self._buffer = without_partitions(self._buffer, partitions)
        return before - self.rows

    def stage(self, columns: list[list]) -> list[Staged]:
        """Write taken columns to new part files, one per event date, under their temporary
        names, durably (file and folder entry flushed); nothing is visible to readers yet."""
        if not columns[0]:
            return []
        self._take_lock()  # no temporary file of ours may exist without our lock
        table = pa.Table.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA, strict=False)], schema=SCHEMA
        )
        days = pc.floor(pc.divide(table.column("ts"), _DAY_MS))
        staged: list[Staged] = []
        try:
            for day in sorted(set(days.to_pylist())):
                staged.append(self._stage(int(day), table.filter(pc.equal(days, day))))
            for folder in {s.final.parent for s in staged}:
                _fsync_dir(folder)
        except OSError:
            # All or nothing: the caller puts every taken event back and writes them again later,
            # so the files of the days already written would otherwise hold them twice.
            self.discard(staged)
            raise
        return staged

    def publish(self, staged: list[Staged]) -> list[Path]:
        """Rename staged files into place (durably). A file already in place is left as it is."""
        for s in staged:
            try:
                os.replace(s.temporary, s.final)
            except FileNotFoundError:
                if not s.final.exists():
                    raise
        for folder in {s.final.parent for s in staged}:
            _fsync_dir(folder)
        for s in staged:
            log.debug("event log: -> %s", s.final)
        return [s.final for s in staged]

    @staticmethod
    def discard(staged: list[Staged]) -> None:
        """Remove staged files that will not be published."""
        for s in staged:
            try:
                s.temporary.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("event log: could not remove %s (%s)", s.temporary, exc)

    def write(self, columns: list[list]) -> list[Path]:
        """Stage and publish at once (no fence): for tools and tests, not the consumer."""
        staged = self.stage(columns)
        try:
            return self.publish(staged)
        except OSError:
            self.discard(staged)
            raise

    def roll(self) -> list[Path]:
        """Write the whole buffer now (on the calling thread)."""
        return self.write(self.take())

    def _stage(self, day: int, table: pa.Table) -> Staged:
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
        log.debug("event log: %d rows staged in %s", table.num_rows, temporary)
        return Staged(temporary, folder / name)

    # ------------------------------------------------------------------------------ leftovers

    def resolve_leftovers(self, committed: Callable[[list[str]], set[str]]) -> tuple[list[Path], list[Path]]:
        """Settle the temporary files of writers that are gone (their lock is free or missing):
        publish those whose names ``committed`` returns (their roll went through in Redis),
        remove the others (their events are read again from Kafka by the partitions' owner).
        Files of live writers, this one included, are left alone. Returns (published, removed).
        ``committed`` may raise (Redis down): nothing is then touched."""
        by_writer: dict[str, list[Path]] = {}
        for path in self.directory.glob("date=*/.part-*.parquet.tmp"):
            match = _TEMP_NAME.match(path.name)
            writer = match.group("writer") if match else ""
            if writer != self._writer_id:
                by_writer.setdefault(writer, []).append(path)
        published: list[Path] = []
        removed: list[Path] = []
        for writer, paths in sorted(by_writer.items()):
            lock = self._lock_of_gone_writer(writer)
            if lock is False:
                continue  # alive: its rolls are its own
            try:
                staged = [Staged(p, p.with_name(p.name[1 : -len(".tmp")])) for p in paths]
                done = committed([s.name for s in staged])
                keep = [s for s in staged if s.name in done]
                published += self.publish(keep)
                drop = [s for s in staged if s.name not in done]
                self.discard(drop)
                removed += [s.temporary for s in drop]
                if isinstance(lock, int):
                    (self.directory / f".writer-{writer}.lock").unlink(missing_ok=True)
            finally:
                if isinstance(lock, int):
                    os.close(lock)
        for path in published:
            log.info("event log: published %s (its writer stopped after its roll went through)", path)
        for path in removed:
            log.info("event log: removed %s (its writer stopped before its roll went through)", path)
        return published, removed

    def _lock_of_gone_writer(self, writer: str) -> int | bool | None:
        """False: the writer is alive. Otherwise its lock, now held here (None: it has none)."""
        if not writer:
            return None  # not a name this version writes
        try:
            fd = os.open(self.directory / f".writer-{writer}.lock", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return fd

    def own_leftovers(self) -> list[Staged]:
        """This writer's temporary files (staged, not yet published or discarded)."""
        out = []
        for path in self.directory.glob(f"date=*/.part-*-{self._writer_id}-*.parquet.tmp"):
            out.append(Staged(path, path.with_name(path.name[1 : -len(".tmp")])))
        return out

    def close(self) -> None:
        """Release the writer's lock; the lock file goes too unless temporaries are left, so
        the next :meth:`resolve_leftovers` anywhere settles them."""
        if self._lock_fd is None:
            return
        try:
            if not self.own_leftovers():
                self._lock_path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None


def _empty_columns() -> list[list]:
    return [[] for _ in range(len(SCHEMA) + 1)]


def without_partitions(columns: list[list], partitions: Iterable[int]) -> list[list]:
    """The columns without the events of these partitions."""
    drop = set(partitions)
    part = columns[PARTITION]
    if not drop or not drop.intersection(part):
        return columns
    keep = [i for i, p in enumerate(part) if p not in drop]
    return [[c[i] for i in keep] for c in columns]


def partitions_of(columns: list[list]) -> set[int]:
    return set(columns[PARTITION])


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
