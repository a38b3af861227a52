"""The run folder: every file name in it, where evidence goes, and how checkpoints are named and committed.

One folder per run; `trainctl status` works from it alone, supervisor alive or dead (README: 'The run folder').
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from . import fsio

CONFIG_FILE = "config.toml"          # the frozen config (what resume uses)
STATE_FILE = "state.json"            # records.RunState, written by the supervisor
JOURNAL_FILE = "journal.sqlite3"     # every event (lifecycle.Event), SQLite in WAL mode
HEARTBEAT_FILE = "heartbeat.json"    # protocol.Heartbeat, written by the worker
METRICS_FILE = "metrics.jsonl"
BAD_IMAGES_FILE = "bad_images.json"
DATA_MANIFEST_FILE = "data_manifest.jsonl"   # the training files the checkpoints were made with (manifest.py)
LABELS_FILE = "labels.json"
SANITY_FILE = "sanity.json"          # the sanity checks passed, one per rung (worker/sanity.py)
MODEL_FILE = "model.safetensors"
MODEL_DIR = "model"                  # the final model in timm's own format: config.json + model.safetensors
REPORT_FILE = "report.md"
REPORT_JSON = "report.json"
TENSORBOARD_DIR = "tensorboard"      # [logging] tensorboard = true: event files (worker/tensorboard_log.py)
SUPERVISOR_LOCK = "supervisor.lock"
WORKER_LOCK = "worker.lock"
CHECKPOINT_DIR = "checkpoints"
EVIDENCE_DIR = "evidence"
FAULTS_FIRED_DIR = "faults-fired"    # test-only: which `once` faults have fired
LOG_DIR = "logs"
WORKER_LOG = "worker.log"
SUPERVISOR_LOG = "supervisor.log"    # a detached supervisor's console
SERVICE_LOG = "service.log"          # launchd's stdout/stderr of the service
LOGS = (WORKER_LOG, SUPERVISOR_LOG, SERVICE_LOG)


def _rank(rank: int | None) -> str:
    return "" if rank is None else f".rank-{rank}"


def fault_log_path(run_dir: Path, attempt: int, rank: int | None = None) -> Path:
    """Where attempt K's faulthandler output goes (`rank`: one process of a group's, worker/group.py gathers them)."""
    return Path(run_dir) / EVIDENCE_DIR / f"attempt-{attempt:03d}{_rank(rank)}.fault.log"


def error_json_path(run_dir: Path, attempt: int, rank: int | None = None) -> Path:
    """Where attempt K's Python exception report goes (`rank`: as for fault_log_path)."""
    return Path(run_dir) / EVIDENCE_DIR / f"attempt-{attempt:03d}{_rank(rank)}.error.json"


def group_record_path(run_dir: Path, attempt: int) -> Path:
    """A group's attempt (nproc_per_node > 1): how each rank ended and which failed first (worker/group.py)."""
    return Path(run_dir) / EVIDENCE_DIR / f"attempt-{attempt:03d}.group.json"


def read_json(path: Path) -> dict | None:
    """Read a JSON object, or None when the file is missing, half-written or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl as written, oldest first (re-done steps after a crash appear again, marked by
    attempt); a line cut by a crash, or being written now, is left out."""
    records = []
    try:
        with open(Path(run_dir) / METRICS_FILE, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
    except OSError:
        pass
    return records


def read_error(run_dir: Path, attempt: int) -> dict | None:
    """Attempt K's Python exception report, or None."""
    return read_json(error_json_path(run_dir, attempt))


# Checkpoint files: "step-000001234.pt" is committed once "step-000001234.json" (its marker, with
# size and CRC-32) exists; the marker is written only after the data file is durable. A marker whose
# fields are not what the worker writes, or whose size is not the data file's, is no commit marker.
# Checkpoints that fail verification are moved (data file, marker and a reason file) into
# checkpoints/corrupt/; `trainctl resume --from-scratch` moves every checkpoint file into
# checkpoints/set-aside-<time>/. Nothing there is ever deleted or read back as a checkpoint.
CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")
MARKER_NAME = re.compile(r"^step-(\d+)\.json$")
CORRUPT_DIR = "corrupt"                  # in checkpoints/: the ones that failed verification
SET_ASIDE_PREFIX = "set-aside-"          # in checkpoints/: what `resume --from-scratch` moved away
REASON_SUFFIX = ".reason.json"           # beside a set-aside checkpoint: why, and when
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class Committed:
    step: int
    path: Path
    marker: dict


@dataclass(frozen=True)
class Rejected:
    """A checkpoint file or marker that is not a valid commit: `data` and/or `marker` exist."""
    step: int
    data: Path | None
    marker: Path | None
    reason: str


@dataclass(frozen=True)
class Scan:
    committed: list[Committed]      # valid markers whose data file has the recorded size, oldest first
    rejected: list[Rejected]        # a marker with bad fields or the wrong size, or a marker without data
    uncommitted: list[Path]         # data files without a marker (a crash between rename and marker)


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:09d}.pt"


def marker_path(data: Path) -> Path:
    return Path(data).with_suffix(".json")


def is_whole(v) -> bool:
    """An int, not a bool (JSON read back from a file anyone may have edited)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v) -> bool:
    """A finite int or float (not a bool, None, NaN, inf, a string from a hand-edited file, or a whole number
    too large for a float: 400 typed digits would raise OverflowError wherever it is used as one)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _is_hex(v, digits: int) -> bool:
    return isinstance(v, str) and len(v) == digits and bool(_HEX.match(v))


def marker_problem(marker: dict | None, step: int, data: Path) -> str | None:
    """Why `marker` is not the commit marker of `data` (checkpoint `step`), or None when it is.

    Cheap checks only (fields and the data file's size; no checksum): the supervisor relies on them, the
    worker runs them before it computes any checksum."""
    if marker is None:
        return "its commit marker is not a JSON object"
    if marker.get("step") != step or not is_whole(marker.get("step")):
        return f"its commit marker says step {marker.get('step')!r}, not {step}"
    size = marker.get("size")
    if not is_whole(size) or size < 0:
        return f"its commit marker's size {size!r} is not a byte count"
    if "crc32" not in marker and "sha256" not in marker:
        return "its commit marker records no checksum"
    if "crc32" in marker:
        if not _is_hex(marker.get("crc32"), 8):
            return f"its commit marker's crc32 {marker.get('crc32')!r} is not 8 hex digits"
    elif not _is_hex(marker.get("sha256"), 64):
        return f"its commit marker's sha256 {marker.get('sha256')!r} is not 64 hex digits"
    if "created" in marker and not is_finite_number(marker["created"]):
        return f"its commit marker's created {marker['created']!r} is not a time"
    if marker.get("taken") is not None and not is_finite_number(marker["taken"]):
        return f"its commit marker's taken {marker['taken']!r} is not a time"
    if "format" in marker and not is_whole(marker["format"]):
        return f"its commit marker's format {marker['format']!r} is not a number"
    if "file" in marker and marker["file"] != data.name:
        return f"its commit marker names {marker['file']!r}, not {data.name}"
    try:
        actual = data.stat().st_size
    except OSError as e:
        return f"its data file is unreadable ({e.strerror})"
    if actual != size:
        return f"size {actual} != {size} recorded at commit (torn or truncated)"
    return None


def scan_checkpoints(folder: Path) -> Scan:
    """Every checkpoint file in `folder`, sorted by parsed step number (never by name)."""
    try:
        names = set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return Scan([], [], [])
    steps: dict[int, list[str]] = {}
    for name in names:
        m = CHECKPOINT_NAME.match(name) or MARKER_NAME.match(name)
        if m:
            steps.setdefault(int(m.group(1)), []).append(name)
    committed, rejected, uncommitted = [], [], []
    for step, found in sorted(steps.items()):
        data = next((Path(folder) / n for n in found if n.endswith(".pt")), None)
        marker = next((Path(folder) / n for n in found if n.endswith(".json")), None)
        if marker is None:
            uncommitted.append(data)
        elif data is None:
            rejected.append(Rejected(step, None, marker, "a commit marker without its data file"))
        else:
            record = read_json(marker)
            problem = marker_problem(record, step, data)
            if problem is None:
                committed.append(Committed(step, data, record))
            else:
                rejected.append(Rejected(step, data, marker, problem))
    return Scan(committed, rejected, uncommitted)


def committed_checkpoints(folder: Path) -> list[Committed]:
    """Checkpoints with a valid commit marker and the recorded size, oldest first (by parsed step number)."""
    return scan_checkpoints(folder).committed


def committed_before(folder: Path) -> bool:
    """Whether this run ever committed a checkpoint: a marker (valid or not) is here, or one was set aside.
    Data files alone are not: a crash during the very first write leaves one without its marker."""
    try:
        if any(MARKER_NAME.match(n) for n in os.listdir(folder)):
            return True
        return any(os.scandir(Path(folder) / CORRUPT_DIR))
    except (FileNotFoundError, NotADirectoryError):
        return False


def newest_checkpoint(run_dir: Path) -> Committed | None:
    """The run's newest committed checkpoint, or None (the cheap checks only: the worker verifies checksums)."""
    found = committed_checkpoints(Path(run_dir) / CHECKPOINT_DIR)
    return found[-1] if found else None


def set_aside_checkpoints(folder: Path) -> list[dict]:
    """The checkpoints the worker moved from checkpoints folder `folder` into corrupt/, oldest first: file
    (where it is now, relative to `folder`), was (its name before), step, reason, time."""
    corrupt = Path(folder) / CORRUPT_DIR
    try:
        names = sorted(n for n in os.listdir(corrupt) if n.endswith(REASON_SUFFIX))
    except OSError:
        return []
    out = []
    for name in names:
        r = read_json(corrupt / name) or {}
        moved = r.get("moved_to") if isinstance(r.get("moved_to"), str) else name
        out.append({"file": f"{CORRUPT_DIR}/{moved}", "was": str(r.get("file", "")),
                    "step": r.get("step") if is_whole(r.get("step")) else None,
                    "reason": str(r.get("reason", "")), "time": r.get("time") if is_finite_number(r.get("time")) else None})
    return sorted(out, key=lambda r: r["time"] or 0)


def set_aside_all(run_dir: Path) -> tuple[Path, list[str]]:
    """Move every checkpoint file of the run (and checkpoints/corrupt/) into checkpoints/set-aside-<time>/
    (`trainctl resume --from-scratch`): nothing is deleted. Returns the folder and the files moved (relative
    to it)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    try:
        names = sorted(n for n in os.listdir(folder)
                       if CHECKPOINT_NAME.match(n) or MARKER_NAME.match(n) or n == CORRUPT_DIR)
    except (FileNotFoundError, NotADirectoryError):
        names = []
    dest = folder / f"{SET_ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    base, n = dest.name, 1
    while dest.exists():
        n += 1
        dest = folder / f"{base}.{n}"
    if not names:
        return dest, []
    dest.mkdir(parents=True)
    files = []
    # Markers first: a crash halfway leaves data files without markers (never trusted), not the reverse.
    for name in sorted(names, key=lambda n: not n.endswith(".json")):
        if name == CORRUPT_DIR:
            files += sorted(f"{CORRUPT_DIR}/{f}" for f in os.listdir(folder / name))
        else:
            files.append(name)
        os.replace(folder / name, dest / name)
    fsio.fsync_dir(folder)
    return dest, files
