"""The supervisor–worker contract: exit codes, file names, environment variables, heartbeat.

Standard library only: the supervisor imports this module (and `config`, `fsio`), never torch.

Start: ``python -m trainctl.worker --run-dir DIR --profile N --attempt K`` in a new session.
Signals to the worker (handlers only set flags):
  SIGTERM  finish the current optimiser step, checkpoint, exit ``EXIT_STOPPED``.
  SIGUSR1  checkpoint as soon as the current optimiser step ends, keep training.
Evidence: ``faulthandler`` writes native-crash tracebacks to ``evidence/attempt-K.fault.log``;
a Python exception is written as JSON to ``evidence/attempt-K.error.json`` before exit.
Progress: ``heartbeat.json`` (atomic, not fsynced); ``beat`` grows with every micro-batch, so a
worker whose main thread is stuck stops beating. Times in it are informative only: the supervisor
timestamps changes with its own monotonic clock.
Orphans: the worker polls its parent pid (``ENV_SUPERVISOR_PID``); when the supervisor is gone it
checkpoints and stops, and hard-exits after ``ORPHAN_GRACE_SECONDS`` if the step does not end.
Exclusion: the worker holds ``worker.lock`` for its whole life; a second worker on a run exits
with ``EXIT_LOCKED`` before touching anything.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

# Exit codes (sysexits-style numbers, far from Python's own 1 and 2).
EXIT_DONE = 0
EXIT_EXCEPTION = 70      # an uncaught Python exception (error JSON written)
EXIT_DISK_FULL = 74      # not enough space to write a checkpoint; the previous one is intact
EXIT_STOPPED = 75        # stopped on request after writing a checkpoint
EXIT_OOM = 77            # a caught out-of-memory error (CUDA, MPS or CPU allocator)
EXIT_CONFIG = 78         # bad config or data: restarting will not help
EXIT_LOCKED = 79         # another worker holds this run

EXIT_NAMES = {
    EXIT_DONE: "done",
    EXIT_EXCEPTION: "exception",
    EXIT_DISK_FULL: "disk_full",
    EXIT_STOPPED: "stopped",
    EXIT_OOM: "oom",
    EXIT_CONFIG: "config_error",
    EXIT_LOCKED: "locked",
}

# Environment passed from supervisor to worker.
ENV_SUPERVISOR_PID = "TRAINCTL_SUPERVISOR_PID"
ENV_FAULTS = "TRAINCTL_FAULTS"           # test-only fault injection, inert when unset
ORPHAN_GRACE_SECONDS = 30.0
# Set for every worker before torch loads: unsupported MPS ops fall back to the CPU instead of dying.
WORKER_ENV = {"PYTORCH_ENABLE_MPS_FALLBACK": "1", "PYTHONUNBUFFERED": "1"}

# Files in the run directory.
CONFIG_FILE = "config.toml"
STATE_FILE = "state.json"
JOURNAL_FILE = "journal.sqlite3"
HEARTBEAT_FILE = "heartbeat.json"
METRICS_FILE = "metrics.jsonl"
BAD_IMAGES_FILE = "bad_images.json"
LABELS_FILE = "labels.json"
MODEL_FILE = "model.safetensors"
REPORT_FILE = "report.md"
SUPERVISOR_LOCK = "supervisor.lock"
WORKER_LOCK = "worker.lock"
CHECKPOINT_DIR = "checkpoints"
EVIDENCE_DIR = "evidence"
LOG_DIR = "logs"
WORKER_LOG = "worker.log"
SUPERVISOR_LOG = "supervisor.log"

# Heartbeat phases, in the order a healthy worker goes through them.
PHASES = ("booting", "loading", "sanity", "training", "validating", "exporting", "done")


def fault_log_path(run_dir: Path, attempt: int) -> Path:
    """Where attempt K's faulthandler output goes."""
    return Path(run_dir) / EVIDENCE_DIR / f"attempt-{attempt:03d}.fault.log"


def error_json_path(run_dir: Path, attempt: int) -> Path:
    """Where attempt K's Python exception report goes."""
    return Path(run_dir) / EVIDENCE_DIR / f"attempt-{attempt:03d}.error.json"


def read_json(path: Path) -> dict | None:
    """Read a JSON object, or None when the file is missing, half-written or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_heartbeat(run_dir: Path) -> dict | None:
    """The worker's latest heartbeat, or None."""
    return read_json(Path(run_dir) / HEARTBEAT_FILE)


def read_error(run_dir: Path, attempt: int) -> dict | None:
    """Attempt K's Python exception report, or None."""
    return read_json(error_json_path(run_dir, attempt))



# Checkpoint files: "step-000001234.pt" is committed once "step-000001234.json" (its marker, with
# size and CRC-32) exists; the marker is written only after the data file is durable.
CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")


@dataclass(frozen=True)
class Committed:
    step: int
    path: Path
    marker: dict


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:09d}.pt"


def marker_path(data: Path) -> Path:
    return Path(data).with_suffix(".json")


def committed_checkpoints(folder: Path) -> list[Committed]:
    """Checkpoints with a commit marker, oldest first (by parsed step number, never by name)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = CHECKPOINT_NAME.match(name)
        if not m:
            continue
        path = Path(folder) / name
        marker = read_json(marker_path(path))
        if marker is not None and marker.get("step") == int(m.group(1)):
            out.append(Committed(int(m.group(1)), path, marker))
    return sorted(out, key=lambda c: c.step)
