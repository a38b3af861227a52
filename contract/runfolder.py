"""The run folder: every file name in it, where evidence goes, and how checkpoints are named and committed.

One folder per run; `trainctl status` works from it alone, supervisor alive or dead (README: 'The run folder').
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.toml"          # the frozen config (what resume uses)
STATE_FILE = "state.json"            # records.RunState, written by the supervisor
JOURNAL_FILE = "journal.sqlite3"     # every event (lifecycle.Event), SQLite in WAL mode
HEARTBEAT_FILE = "heartbeat.json"    # protocol.Heartbeat, written by the worker
METRICS_FILE = "metrics.jsonl"
BAD_IMAGES_FILE = "bad_images.json"
LABELS_FILE = "labels.json"
MODEL_FILE = "model.safetensors"
REPORT_FILE = "report.md"
REPORT_JSON = "report.json"
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


def newest_checkpoint(run_dir: Path) -> Committed | None:
    """The run's newest committed checkpoint, or None."""
    found = committed_checkpoints(Path(run_dir) / CHECKPOINT_DIR)
    return found[-1] if found else None
