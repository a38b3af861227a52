"""Durable checkpoints: atomic write, a commit marker with size and checksum, verified resume.

A checkpoint is ``checkpoints/step-000001234.pt``; it is *committed* once its marker
``step-000001234.json`` (size, CRC-32) exists, and the marker is written only after the data file
is fsynced, renamed and its directory fsynced. Resume takes the newest committed checkpoint that
verifies and loads with ``weights_only=True``; anything else is skipped and reported, never
deleted (only our own temporary files are). Old checkpoints are pruned only after a newer one is
committed. Step numbers are parsed, never compared as strings.

The checksum guards against torn, truncated and changed files (safety against malicious files is
`weights_only=True`'s job): a whole-file CRC-32 (zlib), the check zip and PNG use, three times cheaper
than SHA-256 — it runs beside training during background writes. It makes torch.save's own per-record
CRC-32 redundant, so that is switched off while we save. Markers written with "sha256" still verify.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from trainctl.contract import fsio
from trainctl.contract.runfolder import (CHECKPOINT_NAME, Committed, checkpoint_path, committed_checkpoints,
                                         marker_path)

FORMAT = 1


class DiskFull(OSError):
    """Not enough space for a checkpoint; the previous checkpoints are untouched."""


class _Crc32:
    def __init__(self):
        self.value = 0

    def update(self, b) -> None:
        self.value = zlib.crc32(b, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


class _HashingWriter(io.RawIOBase):
    """Passes writes to a file while checksumming them; `on_bytes` sees the running total (fault hook).

    A large chunk (a tensor's bytes) is checksummed on a helper thread while the file write runs: both
    release the GIL, so a commit costs max(checksum, write) instead of their sum. The call still
    returns only when both are done, so the bytes are never needed after it.

    Every WRITEBACK_BYTES the kernel is told to start writing what we have written so far (Linux:
    posix_fadvise DONTNEED starts writeback of dirty pages and drops them once clean), so the disk
    works while we serialise the rest and the final fsync has little left to wait for; the checkpoint
    also does not crowd the page cache on a memory-tight machine.
    """
    PARALLEL_BYTES = 1 << 20
    WRITEBACK_BYTES = 16 << 20   # 8–64 MiB all help about equally (bench/RESULTS.md, --writeback-sweep)

    def __init__(self, f, on_bytes: Callable[[int], None], pool: ThreadPoolExecutor):
        self.f, self.crc, self.size, self.on_bytes, self.pool = f, _Crc32(), 0, on_bytes, pool
        self.written_back = 0
        self.error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            if len(b) >= self.PARALLEL_BYTES:
                hashed = self.pool.submit(self.crc.update, b)
                try:
                    self.f.write(b)
                finally:
                    hashed.result()
            else:
                self.f.write(b)
                self.crc.update(b)
            self.size += len(b)
            if self.size - self.written_back >= self.WRITEBACK_BYTES:
                self._start_writeback()
            self.on_bytes(self.size)
        except BaseException as e:
            # torch's zip writer turns this into a vague RuntimeError later; keep the real cause.
            self.error = self.error or e
            raise
        return len(b)

    def _start_writeback(self) -> None:
        if self.WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):   # not on macOS: F_FULLFSYNC at the end
            self.f.flush()
            os.posix_fadvise(self.f.fileno(), self.written_back, self.size - self.written_back,
                             os.POSIX_FADV_DONTNEED)
        self.written_back = self.size


def save(folder: Path, step: int, state: dict, keep_last: int, info: dict,
         on_phase: Callable[[str], None] = lambda _p: None) -> Committed:
    """Write, commit and prune. Raises DiskFull (leaving older checkpoints intact) when space runs out."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _check_space(folder, state)
    path = checkpoint_path(folder, step)
    on_phase("begin")
    try:
        with (fsio.atomic_writer(path, on_phase=on_phase) as f, ThreadPoolExecutor(1, "trainctl-crc") as pool,
              _without_torch_crc()):
            writer = _HashingWriter(f, lambda n: on_phase("bytes") if n > (1 << 16) else None, pool)
            try:
                torch.save(state, writer)
            except Exception:
                if writer.error is not None:
                    raise writer.error from None
                raise
        marker = {"format": FORMAT, "step": step, "file": path.name, "size": writer.size,
                  "crc32": writer.crc.hexdigest(), "created": time.time(), **info}
        fsio.atomic_write_json(marker_path(path), marker)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFull(e.errno, f"no space left to write checkpoint {path.name} in {folder} "
                                    f"({os.strerror(e.errno)})") from None
        raise
    on_phase("marked")
    prune(folder, keep_last)
    return Committed(step, path, marker)


@contextlib.contextmanager
def _without_torch_crc():
    """torch.save's per-record CRC-32 costs 0.5 s per GB and our whole-file checksum covers it.
    (A process-wide switch: nothing else in the worker saves while a checkpoint is written.)"""
    get = getattr(torch.serialization, "get_crc32_options", None)   # torch >= 2.6
    if get is None:
        yield
        return
    before = get()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


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
        digest, expected = _file_checksum(c.path, c.marker)
    except OSError as e:
        return f"unreadable ({e})"
    if digest is None:
        return "its commit marker records no checksum"
    if digest != expected:
        return "checksum mismatch (bytes changed after commit)"
    return None


def _file_checksum(path: Path, marker: dict) -> tuple[str | None, str | None]:
    """(the file's checksum, the marker's) in the algorithm the marker names."""
    with open(path, "rb") as f:
        if "crc32" in marker:
            crc = _Crc32()
            while chunk := f.read(16 << 20):
                crc.update(chunk)
            return crc.hexdigest(), marker["crc32"]
        if "sha256" in marker:   # markers written before the switch to CRC-32
            return hashlib.file_digest(f, "sha256").hexdigest(), marker["sha256"]
    return None, None


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
