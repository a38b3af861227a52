"""The run's durable, append-only event journal: SQLite in WAL mode.

WAL lets `trainctl status` read while the supervisor writes; synchronous=FULL makes every event
durable when `record` returns; SQLite's journal makes a write torn by a crash roll back, never
corrupt. Readers open the database read-only.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from trainctl.worker.protocol import JOURNAL_FILE

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,           -- wall clock (seconds since the epoch), for people
    kind TEXT NOT NULL,           -- start, state, spawn, crash, restart, step_down, checkpoint, ...
    attempt INTEGER,
    profile INTEGER,
    step INTEGER,
    data TEXT NOT NULL            -- JSON details
);
CREATE INDEX IF NOT EXISTS events_kind ON events(kind);
"""


class Journal:
    """Writer side, owned by the supervisor."""

    def __init__(self, run_dir: Path):
        self.db = sqlite3.connect(Path(run_dir) / JOURNAL_FILE, timeout=10, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def record(self, kind: str, attempt: int | None = None, profile: int | None = None,
               step: int | None = None, **data) -> None:
        self.db.execute("INSERT INTO events (time, kind, attempt, profile, step, data) VALUES (?, ?, ?, ?, ?, ?)",
                        (time.time(), kind, attempt, profile, step, json.dumps(data, default=str)))

    def close(self) -> None:
        self.db.close()


def read_events(run_dir: Path, kinds: tuple[str, ...] = (), limit: int | None = None) -> list[dict]:
    """Events oldest first (the newest `limit` when given); [] when there is no journal yet."""
    path = Path(run_dir) / JOURNAL_FILE
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return []
    try:
        where = f"WHERE kind IN ({','.join('?' * len(kinds))})" if kinds else ""
        sql = f"SELECT id, time, kind, attempt, profile, step, data FROM events {where} ORDER BY id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        rows = db.execute(sql, kinds).fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()
    return [{"id": r[0], "time": r[1], "kind": r[2], "attempt": r[3], "profile": r[4], "step": r[5],
             "data": json.loads(r[6])} for r in reversed(rows)]
