"""The run's durable, append-only event journal: SQLite in WAL mode.

WAL lets `trainctl status` read while the supervisor writes; synchronous=FULL makes every event
durable when `record` returns; SQLite's journal makes a write torn by a crash roll back, never
corrupt. Readers open the database read-only.

A journal that cannot be written (locked by another program, a full disk, a broken file) must not
cost the run anything: the events wait in memory, are retried every few seconds, and the trouble
is said once, and again when it heals. Events still waiting when the supervisor dies are lost.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Callable

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


class Journal:
    """Writer side, owned by the supervisor."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None] = lambda _m: None,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(run_dir) / JOURNAL_FILE
        self.clock = clock
        self.db: sqlite3.Connection | None = None
        self.pending: list[tuple] = []
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
            self._write(self._open())
        except sqlite3.Error as e:
            self.close()
            self.retry_at = self.clock() + RETRY_SECONDS
            self.trouble.failed(e, f"keeping {len(self.pending)} event(s) in memory, retrying every "
                                   f"{RETRY_SECONDS:g} s; training goes on")
            return False
        late = len(self.pending)
        self.pending.clear()
        self.trouble.healed(f"{late} event(s) written late" + (f", {self.dropped} dropped" if self.dropped else ""))
        return True

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
            self.db = db
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
