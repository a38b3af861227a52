"""The run's durable, append-only event journal: SQLite in WAL mode.

WAL lets `trainctl status` read while the supervisor writes; synchronous=FULL makes every event
durable when `record` returns; SQLite's journal makes a write torn by a crash roll back, never
corrupt. Readers open the database read-only.

A journal that cannot be written (locked by another program, a full disk) must not cost the run
anything: the events wait in memory, are retried every few seconds, and the trouble is said once,
and again when it heals. Events still waiting when the supervisor dies are lost.

A journal that is not a database (garbage, a damaged file) is set aside as
``journal.sqlite3.damaged-<time>`` and a fresh one started; a journal deleted (or replaced) while the
supervisor writes it is noticed at the next write. Either way the fresh journal gets this supervisor's
own events again and a ``journal_reset`` event saying why, and the person is told once.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable

from trainctl.contract import fsio
from trainctl.contract.lifecycle import Event
from trainctl.contract.runfolder import JOURNAL_FILE

from .trouble import Trouble

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,           -- wall clock (seconds since the epoch), for people
    kind TEXT NOT NULL,           -- a lifecycle.Event
    attempt INTEGER,
    profile INTEGER,              -- the rung's 0-based index (the column keeps its 0.1 name: old journals stay usable)
    step INTEGER,
    data TEXT NOT NULL            -- JSON details
);
CREATE INDEX IF NOT EXISTS events_kind ON events(kind);
"""
INSERT = "INSERT INTO events (time, kind, attempt, profile, step, data) VALUES (?, ?, ?, ?, ?, ?)"
BUSY_TIMEOUT_SECONDS = 1.0     # the supervisor is the only writer: a lock held longer is someone else's
RETRY_SECONDS = 5.0
MAX_PENDING = 10_000           # beyond this, the oldest waiting events are dropped (and counted)
MAX_REMEMBERED = 10_000        # this supervisor's events kept to write again into a fresh journal
DAMAGED_CODES = ("SQLITE_NOTADB", "SQLITE_CORRUPT")   # the file is not (or no longer) a database


class Journal:
    """Writer side, owned by the supervisor."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None] = lambda _m: None,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(run_dir) / JOURNAL_FILE
        self.clock = clock
        self.db: sqlite3.Connection | None = None
        self.pending: list[tuple] = []
        self.written: collections.deque[tuple] = collections.deque(maxlen=MAX_REMEMBERED)
        self.identity: tuple[int, int] | None = None   # (device, inode) of the file opened
        self.echo = echo
        self.dropped = 0
        self.retry_at = 0.0
        self.trouble = Trouble(f"the journal ({self.path})", echo)

    def record(self, event: Event, attempt: int | None = None, rung_index: int | None = None,
               step: int | None = None, **data) -> None:
        """Append one event: durable when this returns, unless the journal is failing (then kept and retried)."""
        if len(self.pending) >= MAX_PENDING:
            self.pending.pop(0)
            self.dropped += 1
        self.pending.append((time.time(), Event(event).value, attempt, rung_index, step,
                             json.dumps(data, default=str)))
        self.flush()

    def flush(self) -> bool:
        """Write the waiting events; False while the journal cannot be written (tried again after RETRY_SECONDS)."""
        if not self.pending:
            return True
        if self.trouble.failing and self.clock() < self.retry_at:
            return False
        try:
            self._check_file()
            try:
                self._write(self._open())
            except sqlite3.DatabaseError as e:
                if not damaged(e):
                    raise
                self.reset(f"{self.path.name} is damaged ({e})", set_aside=True)
                self._write(self._open())
        except (sqlite3.Error, OSError) as e:
            self.close()
            self.retry_at = self.clock() + RETRY_SECONDS
            self.trouble.failed(e, f"keeping {len(self.pending)} event(s) in memory, retrying every "
                                   f"{RETRY_SECONDS:g} s; training goes on")
            return False
        late = len(self.pending)
        self.written.extend(row for row in self.pending if row[1] != Event.JOURNAL_RESET.value)
        self.pending.clear()
        self.trouble.healed(f"{late} event(s) written late" + (f", {self.dropped} dropped" if self.dropped else ""))
        return True

    def _check_file(self) -> None:
        """The file opened is still the journal: not deleted (events would go to an unlinked file) nor replaced."""
        if self.db is None:
            return
        now = fsio.file_identity(self.path)
        if now != self.identity:
            self.close()
            self.reset(f"{self.path.name} was {'deleted' if now is None else 'replaced'} while the supervisor "
                       f"wrote it", set_aside=now is not None)

    def reset(self, why: str, set_aside: bool) -> None:
        """A fresh journal: the old file kept aside, this supervisor's events written again, the reset recorded
        (written by the next flush)."""
        self.close()
        kept = set_aside_damaged(self.path) if set_aside else None
        if kept is None:   # deleted: a fresh database must not pick up the old one's write-ahead log
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(f"{self.path}{suffix}")
        reset = (time.time(), Event.JOURNAL_RESET.value, None, None, None,
                 json.dumps({"reason": why, "kept": str(kept) if kept else None,
                             "rewritten": len(self.written)}))
        self.pending[:0] = [*self.written, reset]
        again = f" with this supervisor's {len(self.written)} event(s) again" if self.written else ""
        self.echo(f"{why}: " + (f"kept it as {kept.name}; " if kept else "")
                  + f"a fresh journal is started{again} (a journal_reset event); the events before are not in it")

    def _open(self) -> sqlite3.Connection:
        if self.db is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(SCHEMA)
            except sqlite3.Error:
                db.close()
                raise
            self.db, self.identity = db, fsio.file_identity(self.path)
        return self.db

    def _write(self, db: sqlite3.Connection) -> None:
        """All waiting events in one transaction: all of them are durable, or none is written."""
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(INSERT, self.pending)
            db.execute("COMMIT")
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
            self.db = None


def damaged(error: sqlite3.DatabaseError) -> bool:
    """The file is not (or no longer) a database, as opposed to locked or full."""
    return error.sqlite_errorname in DAMAGED_CODES


def set_aside_damaged(path: Path) -> Path:
    """Move a damaged journal (and its -wal, -shm) to journal.sqlite3.damaged-<time>; return the new name."""
    kept = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{kept}{suffix}")
    return kept


def check(run_dir: Path) -> str | None:
    """Before a supervisor takes the run: a journal that is not a database is set aside and a fresh one started
    with a `journal_reset` event; returns the one line to tell the person, or None when the journal is sound."""
    path = Path(run_dir) / JOURNAL_FILE
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        if not damaged(e):
            return None
        said: list[str] = []
        journal = Journal(run_dir, said.append)
        journal.reset(f"{path.name} is damaged ({e})", set_aside=True)
        journal.flush()
        journal.close()
        return said[0] if said else None
    return None


def read_events(run_dir: Path, kinds: tuple[Event, ...] = (), limit: int | None = None) -> list[dict]:
    """Events oldest first (the newest `limit` when given); [] when there is no journal yet.

    Each is a dict: id, time, kind, attempt, rung (0-based index), step, data."""
    path = Path(run_dir) / JOURNAL_FILE
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return []
    try:
        values = tuple(Event(k).value for k in kinds)
        where = f"WHERE kind IN ({','.join('?' * len(values))})" if values else ""
        sql = f"SELECT id, time, kind, attempt, profile, step, data FROM events {where} ORDER BY id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        rows = db.execute(sql, values).fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()
    return [{"id": r[0], "time": r[1], "kind": r[2], "attempt": r[3], "rung": r[4], "step": r[5],
             "data": json.loads(r[6])} for r in reversed(rows)]
