"""Durable checkpoints: atomic write, a commit marker with size and checksum, verified resume.

A checkpoint is ``checkpoints/step-000001234.pt``; it is *committed* once its marker
``step-000001234.json`` (size, CRC-32) exists, and the marker is written only after the data file
is fsynced, renamed and its directory fsynced. Resume takes the newest committed checkpoint that
verifies and loads with ``weights_only=True``. Step numbers are parsed, never compared as strings.

Only checkpoints that verify are trusted: they alone count as "newest" and toward ``keep_last``. One
that fails (bad marker fields, wrong size, implausible size, checksum, refused by torch.load) is moved
with its marker into ``checkpoints/corrupt/`` with a reason file, and reported; never deleted (only our
own temporary files are), and never the reason to prune a good one. Verification is bounded: the
marker's fields and the file's size are checked before any byte is read, and a file far larger than
this run's state could be is refused without reading it. A data file without a marker (a crash between
rename and marker) is reported and left in place. When checkpoints existed and none verifies, the
worker refuses to start over from step 0 (`CannotContinue("no_checkpoint")`): a person decides.

The checksum guards against torn, truncated and changed files (safety against malicious files is
`weights_only=True`'s job): a whole-file CRC-32, the check zip and PNG use. It makes torch.save's own
per-record CRC-32 redundant, so that is switched off while we save. Markers written with "sha256" still verify.

A background write runs beside training on the same cores, so its CPU time is training's loss. It is cut to
about one pass over the state's bytes (`ChecksumWriter`): the file is still torch.save's (loads with
`torch.load(weights_only=True)`, like every older checkpoint), but its bytes bypass the page cache and the
checksum runs at memory speed where zlib-ng is installed.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from trainctl.contract import fsio
from trainctl.contract.protocol import CannotContinue
from trainctl.contract.names import shell_run
from trainctl.contract.runfolder import (CORRUPT_DIR, REASON_SUFFIX, Committed, checkpoint_path, committed_before,
                                         committed_checkpoints, marker_path, scan_checkpoints, set_aside_checkpoints)

from .ckptfile import ChecksumWriter, Crc32

FORMAT = 1


class DiskFull(OSError):
    """Not enough space for a checkpoint; the previous checkpoints are untouched."""


def save(folder: Path, step: int, state: dict, keep_last: int, info: dict,
         on_phase: Callable[[str], None] = lambda _p: None, verified: Verified | None = None) -> Committed:
    """Write, commit and prune. Raises DiskFull (leaving older checkpoints intact) when space runs out.
    `verified` remembers what this process has verified (a fresh one verifies every older checkpoint once)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    verified = verified if verified is not None else Verified()
    if verified.max_bytes is None:
        verified.max_bytes = size_bound(state)
    _check_space(folder, state, verified)
    path = checkpoint_path(folder, step)
    on_phase("begin")
    try:
        with (fsio.atomic_writer(path, on_phase=on_phase) as f, _without_torch_crc(),
              contextlib.closing(ChecksumWriter(f, lambda n: on_phase("bytes") if n > (1 << 16) else None)) as writer):
            try:
                torch.save(state, writer)
            except Exception:
                if writer.error is not None:
                    raise writer.error from None
                raise
            writer.finish()
        marker = {"format": FORMAT, "step": step, "file": path.name, "size": writer.size,
                  "crc32": writer.crc.hexdigest(), "created": time.time(), **info}
        fsio.atomic_write_json(marker_path(path), marker)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFull(e.errno, f"no space left to write checkpoint {path.name} in {folder} "
                                    f"({os.strerror(e.errno)})") from None
        raise
    on_phase("marked")
    done = Committed(step, path, marker)
    verified.vouch(done)
    prune(folder, keep_last, verified)
    return done


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


def _check_space(folder: Path, state: dict, verified: Verified) -> None:
    """Refuse before writing when the disk clearly cannot hold one more checkpoint."""
    need = verified.last_size or _tensor_bytes(state)   # never a marker's word: it may be forged
    need = int(need * 1.05) + (16 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DiskFull(errno.ENOSPC, f"only {size_text(free)} free in {folder}; a checkpoint needs "
                                     f"about {size_text(need)}")


def size_text(n: float) -> str:
    """A size as people say it: '20 MB', '1.5 GB', '640 kB' (decimal units, at most two significant figures
    below ten)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f} {unit}".replace(".0 ", " ") if v < 10 else f"{v:.0f} {unit}"
    return f"{int(n)} bytes"


def size_bound(state: dict, extra: dict | None = None) -> int:
    """The most a checkpoint of a run whose model (or whole state) is `state` can plausibly weigh: the
    model, optimizer moments and the rest with generous slack, and `extra` (saved once beside them: the EMA's
    weights). A bigger file is refused unread."""
    return 8 * _tensor_bytes(state) + _tensor_bytes(extra) + (256 << 20)


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class Verified:
    """The checkpoints this process wrote or verified, by file identity (size, mtime, inode, checksum):
    a file changed since (a flipped byte changes its mtime) is verified again before it is trusted.
    Also collects what was set aside on the writer thread, for the training thread to report."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes          # see size_bound
        self.last_size: int | None = None   # the size of the newest checkpoint vouched for
        self._known: dict[str, tuple] = {}
        self._set_aside: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def vouch(self, c: Committed) -> None:
        self._known[c.path.name] = _identity(c)
        self.last_size = c.marker["size"]

    def check(self, c: Committed) -> str | None:
        """None when `c` is trusted (verified now or earlier and unchanged since); otherwise why not."""
        now = _identity(c)
        if now is not None and self._known.get(c.path.name) == now:
            return None
        problem = verify(c, self.max_bytes)
        if problem is None:
            self.vouch(c)
        return problem

    def note_set_aside(self, name: str, reason: str) -> None:
        with self._lock:
            self._set_aside.append((name, reason))

    def take_set_aside(self) -> list[tuple[str, str]]:
        """What was set aside since the last call."""
        with self._lock:
            out, self._set_aside = self._set_aside, []
        return out


def _identity(c: Committed) -> tuple | None:
    try:
        st = c.path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino, c.marker.get("crc32") or c.marker.get("sha256")


def set_aside(folder: Path, step: int, data: Path | None, marker: Path | None, reason: str) -> str:
    """Move a checkpoint that failed verification (data file and marker) into corrupt/, with a reason
    file; return where it went (relative to `folder`). Never overwrites an earlier one set aside."""
    dest = Path(folder) / CORRUPT_DIR
    dest.mkdir(exist_ok=True)
    stem, n = f"step-{step:09d}", 1
    while any((dest / f"{stem}{suffix}").exists() for suffix in (".pt", ".json", REASON_SUFFIX)):
        n += 1
        stem = f"step-{step:09d}-{n}"
    moved_to = f"{stem}.pt" if data is not None else f"{stem}.json"
    fsio.atomic_write_json(dest / f"{stem}{REASON_SUFFIX}", {
        "step": step, "file": (data or marker).name, "moved_to": moved_to, "reason": reason, "time": time.time()})
    if marker is not None:   # the marker first: a crash halfway leaves a data file without one, never trusted
        os.replace(marker, dest / f"{stem}.json")
    if data is not None:
        os.replace(data, dest / f"{stem}.pt")
    fsio.fsync_dir(folder)
    return f"{CORRUPT_DIR}/{moved_to}"


def _set_aside_and_say(folder: Path, step: int, data: Path | None, marker: Path | None, reason: str) -> str:
    """`reason` and where the files went; a move that fails (a full or read-only disk) leaves them in place,
    still never trusted, and is said instead of failing the checkpoint write or the boot."""
    try:
        return f"{reason}; moved to {set_aside(folder, step, data, marker, reason)}"
    except OSError as e:
        return f"{reason}; left in place (could not move it to {CORRUPT_DIR}/: {e.strerror or e})"


def _set_aside_rejected(folder: Path, verified: Verified) -> list[tuple[str, str]]:
    """Set aside the files whose marker is no commit marker (bad fields, wrong size, no data file)."""
    out = []
    for r in scan_checkpoints(folder).rejected:
        out.append(((r.data or r.marker).name, _set_aside_and_say(folder, r.step, r.data, r.marker, r.reason)))
        verified.note_set_aside(*out[-1])
    return out


def prune(folder: Path, keep_last: int, verified: Verified | None = None) -> None:
    """Keep the newest `keep_last` checkpoints that verify; delete the older ones (marker first, then data).

    A newer one that fails verification is set aside (corrupt/), not counted: a forged marker at step
    999999999 costs a checksum once, never a good checkpoint."""
    verified = verified if verified is not None else Verified()
    _set_aside_rejected(folder, verified)
    kept = 0
    for c in reversed(committed_checkpoints(folder)):
        if kept >= keep_last:
            marker_path(c.path).unlink(missing_ok=True)
            c.path.unlink(missing_ok=True)
            continue
        problem = verified.check(c)
        if problem is None:
            kept += 1
        else:
            verified.note_set_aside(c.path.name, _set_aside_and_say(folder, c.step, c.path, marker_path(c.path), problem))


def verify(c: Committed, max_bytes: int | None = None) -> str | None:
    """None when the data file matches its marker; otherwise why not. The size is checked first, and a
    file larger than `max_bytes` is refused without reading it."""
    try:
        size = c.path.stat().st_size
        if size != c.marker.get("size"):
            return f"size {size} != {c.marker.get('size')} recorded at commit (torn or truncated)"
        if max_bytes is not None and size > max_bytes:
            return (f"{size_text(size)}, far more than a checkpoint of this run can be (at most about "
                    f"{size_text(max_bytes)}); not read")
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
            crc, buffer = Crc32(), memoryview(bytearray(4 << 20))   # one buffer, reused: no fresh pages per read
            while n := f.readinto(buffer):
                crc.update(buffer[:n])
            return crc.hexdigest(), marker["crc32"]
        if "sha256" in marker:   # markers written before the switch to CRC-32
            return hashlib.file_digest(f, "sha256").hexdigest(), marker["sha256"]
    return None, None


def load_latest(folder: Path, verified: Verified | None = None) -> tuple[dict | None, Committed | None,
                                                                        list[tuple[str, str]]]:
    """The newest checkpoint that verifies and loads safely, and every (file, reason) skipped.

    Those that fail are set aside (corrupt/). (None, None, skipped) only when the run never committed a
    checkpoint: when checkpoints existed and none verifies, raises CannotContinue("no_checkpoint")."""
    folder = Path(folder)
    verified = verified if verified is not None else Verified()
    skipped = _set_aside_rejected(folder, verified)
    skipped += [(p.name, "no commit marker (interrupted before commit)") for p in scan_checkpoints(folder).uncommitted]
    for c in reversed(committed_checkpoints(folder)):
        problem = verified.check(c)
        if problem is None:
            try:
                state = torch.load(c.path, map_location="cpu", weights_only=True)
            except MemoryError:
                raise   # says nothing about the file
            except Exception as e:  # weights_only refuses anything that would run code
                problem = f"refused by torch.load(weights_only=True): {str(e).splitlines()[0][:200]}"
            else:
                if isinstance(state, dict) and state.get("format") == FORMAT:
                    return state, c, skipped
                problem = "not a trainctl checkpoint"
        skipped.append((c.path.name, _set_aside_and_say(folder, c.step, c.path, marker_path(c.path), problem)))
    if committed_before(folder):
        raise CannotContinue("no_checkpoint", _none_verifies(folder))
    return None, None, skipped


def _none_verifies(folder: Path) -> str:
    """The refusal to start over: which files failed and why, and what a person can do."""
    run = folder.parent.name
    bad = set_aside_checkpoints(folder)
    shown = "; ".join(f"{b['file']} ({b['reason']})" for b in bad[-5:])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (f"no checkpoint of run {run} verifies ({shown or 'see ' + str(folder)}{more}; all kept in "
            f"{folder / CORRUPT_DIR}), and training will not silently start over from step 0. Fix: put a good "
            f"checkpoint file (with its .json marker) back into {folder}, or start over from step 0 with: "
            f"trainctl resume {shell_run(folder.parent)} --from-scratch")
