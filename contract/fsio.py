"""Durable, atomic file writes: the one helper used wherever a file must never be seen half-written.

Write order: temporary file in the same directory → flush → fsync (``F_FULLFSYNC`` on macOS, where
plain fsync leaves data in the drive cache) → rename over the target → fsync the directory.
Standard library only (the supervisor uses it too).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

TEMP_MARK = ".tmp-"   # our temporary files are ".<name>.tmp-<pid>"; nothing else is ever deleted


def temp_name_for(path: Path) -> Path:
    """The temporary sibling `atomic_writer` writes before renaming onto `path`."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def is_temp_name(name: str) -> bool:
    """True for files that follow our own temporary naming (safe to delete)."""
    return name.startswith(".") and TEMP_MARK in name


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path` now, or None: tells a file deleted or replaced by hand from the one
    we opened or locked."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def fsync_file(fd: int) -> None:
    """Flush a file's data to stable storage (through the drive cache on macOS)."""
    if sys.platform == "darwin":
        import fcntl
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass  # some filesystems (network, FUSE) refuse F_FULLFSYNC; fsync is the best left
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename/creation in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync_file(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: Path, durable: bool, phase: Callable[[str], None]) -> Iterator[Path]:
    """Yield the temporary name to fill; on clean exit rename it onto `path` and fsync the directory.
    On failure the temporary file is removed and `path` is untouched."""
    tmp = temp_name_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    phase("renamed")
    if durable:
        fsync_dir(path.parent)
    phase("committed")


@contextlib.contextmanager
def atomic_writer(path: Path, durable: bool = True,
                  on_phase: Callable[[str], None] | None = None) -> Iterator:
    """Yield a binary file; on clean exit it atomically replaces `path`.

    `durable=False` skips the fsyncs (heartbeats: atomic but not worth a disk flush).
    `on_phase` is called with "written", "synced", "renamed", "committed" (fault-injection hook).
    The file gets the usual umask-based mode, not a temp file's 0600.
    """
    phase = on_phase or (lambda _name: None)
    with _replacing(Path(path), durable, phase) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            phase("written")
            if durable:
                fsync_file(f.fileno())
            phase("synced")


def atomic_write_by_name(path: Path, write: Callable[[Path], None]) -> None:
    """`atomic_writer` for a library that writes to a file name itself (safetensors): `write(tmp)`,
    then fsync, rename onto `path`, fsync the directory; on failure `path` is untouched."""
    with _replacing(Path(path), True, lambda _name: None) as tmp:
        write_by_name(tmp, write)


def write_by_name(path: Path, write: Callable[[Path], None]) -> None:
    """`write(path)` by a library that creates the file itself, then the umask's mode and an fsync.

    The library may create its file 0600 (safetensors does): give it the mode our own files get from the
    umask, learnt from a file created the usual way (os.umask() to read it would race other threads)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
    mode = os.stat(path).st_mode & 0o777
    write(path)
    os.chmod(path, mode)
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync_file(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, durable: bool = True) -> None:
    """Atomically replace `path` with `data`."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_writer(path, durable) as f:
        f.write(data)


def atomic_write_json(path: Path, obj, durable: bool = True) -> None:
    """Atomically replace `path` with `obj` as indented JSON."""
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n", durable)


def remove_stale_temps(directory: Path) -> list[str]:
    """Delete leftovers of interrupted writes (our temp naming only); return their names."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.is_file() and is_temp_name(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed
