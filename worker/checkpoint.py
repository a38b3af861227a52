"""Durable checkpoints: atomic write, a commit marker with size and checksum, verified resume.

A checkpoint is ``checkpoints/step-000001234.pt``; it is *committed* once its marker
``step-000001234.json`` (size, sha256) exists, and the marker is written only after the data file
is fsynced, renamed and its directory fsynced. Resume takes the newest committed checkpoint that
verifies and loads with ``weights_only=True``; anything else is skipped and reported, never
deleted (only our own temporary files are). Old checkpoints are pruned only after a newer one is
committed. Step numbers are parsed, never compared as strings.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from . import fsio
from .protocol import (CHECKPOINT_NAME, Committed, checkpoint_path, committed_checkpoints,
                       marker_path)

FORMAT = 1


class DiskFull(OSError):
    """Not enough space for a checkpoint; the previous checkpoints are untouched."""


class _HashingWriter(io.RawIOBase):
    """Passes writes to a file while hashing them; `on_bytes` sees the running total (fault hook)."""

    def __init__(self, f, on_bytes: Callable[[int], None]):
        self.f, self.sha, self.size, self.on_bytes = f, hashlib.sha256(), 0, on_bytes
        self.error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            self.f.write(b)
            self.sha.update(b)
            self.size += len(b)
            self.on_bytes(self.size)
        except BaseException as e:
            # torch's zip writer turns this into a vague RuntimeError later; keep the real cause.
            self.error = self.error or e
            raise
        return len(b)


def save(folder: Path, step: int, state: dict, keep_last: int, info: dict,
         on_phase: Callable[[str], None] = lambda _p: None) -> Committed:
    """Write, commit and prune. Raises DiskFull (leaving older checkpoints intact) when space runs out."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _check_space(folder, state)
    path = checkpoint_path(folder, step)
    on_phase("begin")
    try:
        with fsio.atomic_writer(path, on_phase=on_phase) as f:
            writer = _HashingWriter(f, lambda n: on_phase("bytes") if n > (1 << 16) else None)
            try:
                torch.save(state, writer)
            except Exception:
                if writer.error is not None:
                    raise writer.error from None
                raise
        marker = {"format": FORMAT, "step": step, "file": path.name, "size": writer.size,
                  "sha256": writer.sha.hexdigest(), "created": time.time(), **info}
        fsio.atomic_write_json(marker_path(path), marker)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFull(e.errno, f"no space left to write checkpoint {path.name} in {folder} "
                                    f"({os.strerror(e.errno)})") from None
        raise
    on_phase("marked")
    prune(folder, keep_last)
    return Committed(step, path, marker)


def _check_space(folder: Path, state: dict) -> None:
    """Refuse before writing when the disk clearly cannot hold one more checkpoint."""
    latest = committed_checkpoints(folder)
    need = latest[-1].marker.get("size", 0) if latest else _tensor_bytes(state)
    need = int(need * 1.05) + (16 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DiskFull(errno.ENOSPC, f"only {free / 2**30:.2f} GiB free in {folder}, a checkpoint needs "
                                     f"about {need / 2**30:.2f} GiB")


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def uncommitted(folder: Path) -> list[Path]:
    """Data files without a valid commit marker (a crash between rename and marker)."""
    done = {c.path.name for c in committed_checkpoints(folder)}
    try:
        return sorted(Path(folder) / n for n in os.listdir(folder) if CHECKPOINT_NAME.match(n) and n not in done)
    except FileNotFoundError:
        return []


def prune(folder: Path, keep_last: int) -> None:
    """Delete committed checkpoints beyond the newest `keep_last` (marker first, then data)."""
    for old in committed_checkpoints(folder)[:-keep_last]:
        marker_path(old.path).unlink(missing_ok=True)
        old.path.unlink(missing_ok=True)


def verify(c: Committed) -> str | None:
    """None when the data file matches its marker; otherwise why not."""
    try:
        size = c.path.stat().st_size
        if size != c.marker.get("size"):
            return f"size {size} != {c.marker.get('size')} recorded at commit (torn or truncated)"
        with open(c.path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        return f"unreadable ({e})"
    if digest != c.marker.get("sha256"):
        return "checksum mismatch (bytes changed after commit)"
    return None


def load_latest(folder: Path) -> tuple[dict | None, Committed | None, list[tuple[str, str]]]:
    """The newest checkpoint that verifies and loads safely, and every (file, reason) skipped."""
    skipped = [(p.name, "no commit marker (interrupted before commit)") for p in uncommitted(folder)]
    for c in reversed(committed_checkpoints(folder)):
        problem = verify(c)
        if problem is None:
            try:
                state = torch.load(c.path, map_location="cpu", weights_only=True)
            except Exception as e:  # weights_only refuses anything that would run code
                problem = f"refused by torch.load(weights_only=True): {str(e).splitlines()[0][:200]}"
            else:
                if isinstance(state, dict) and state.get("format") == FORMAT:
                    return state, c, skipped
                problem = "not a trainctl checkpoint"
        skipped.append((c.path.name, problem))
    return None, None, skipped
