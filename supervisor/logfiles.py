"""Logs: size-bounded by copy-then-truncate (safe because every writer opened the file with O_APPEND), and read from the end."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

MAX_BYTES = 20 << 20
KEEP = 3


def rotate_if_needed(path: Path, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> bool:
    """When `path` is over `max_bytes`: shift path.1 .. path.N, copy path to path.1, truncate path."""
    path = Path(path)
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for i in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    # Writers append (O_APPEND), so after truncation their next line lands at the new end.
    os.truncate(path, 0)
    return True


def tail(path: Path, limit: int) -> str:
    """The last `limit` bytes of a file as text ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
