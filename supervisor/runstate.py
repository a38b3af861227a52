"""The run's current state file and its single-supervisor lock.

"Is this run's supervisor alive?" is answered by the lock (an flock the kernel drops when the
process dies, however it dies), never by a pid alone: pids are reused and zombies keep theirs.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import filelock

from trainctl.contract import fsio
from trainctl.contract.records import RunState
from trainctl.contract.runfolder import STATE_FILE, SUPERVISOR_LOCK, read_json


class AlreadyRunning(RuntimeError):
    """Another supervisor holds this run."""


# `supervisor_alive` probes by taking the lock for an instant; a start that tries at that instant must
# not be refused, so it waits this long for a holder to go (a real supervisor holds it for the run).
PROBE_WAIT_SECONDS = 2.0


def acquire(run_dir: Path, timeout: float = PROBE_WAIT_SECONDS) -> filelock.FileLock:
    """Take the run's supervisor lock or raise AlreadyRunning naming the holder's pid."""
    lock = filelock.FileLock(Path(run_dir) / SUPERVISOR_LOCK)
    try:
        lock.acquire(timeout=timeout, poll_interval=0.01)
    except filelock.Timeout:
        pid = getattr(read_state(run_dir), "supervisor_pid", None)
        raise AlreadyRunning(f"run {Path(run_dir).name} already has a supervisor running"
                             f"{f' (pid {pid})' if pid else ''}; see: trainctl status {run_dir}") from None
    return lock


def supervisor_alive(run_dir: Path) -> bool:
    """True while some process holds the run's supervisor lock."""
    path = Path(run_dir) / SUPERVISOR_LOCK
    if not path.exists():
        return False
    probe = filelock.FileLock(path)
    try:
        probe.acquire(timeout=0)
    except filelock.Timeout:
        return True
    probe.release()
    return False


def read_state(run_dir: Path) -> RunState | None:
    """The run's state.json, or None (never written, half-written, or not ours)."""
    data = read_json(Path(run_dir) / STATE_FILE)
    return RunState.from_json(data) if data is not None else None


def write_state(run_dir: Path, state: RunState, durable: bool = True) -> None:
    """Atomically replace state.json; `updated_at` is the supervisor's 'last seen' for status."""
    fsio.atomic_write_json(Path(run_dir) / STATE_FILE,
                           dataclasses.replace(state, updated_at=time.time()).to_json(), durable)
