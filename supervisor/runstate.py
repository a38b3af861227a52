"""The run's current state file and its single-supervisor lock.

"Is this run's supervisor alive?" is answered by the lock (an flock the kernel drops when the
process dies, however it dies), and, since a lock file can be deleted by hand, by the supervisor
state.json names: its pid *and* its start time (psutil's create_time) still a live process, not a
zombie, its run not ended. Never by a pid alone: pids are reused and zombies keep theirs.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

import filelock
import psutil

from trainctl.contract import fsio
from trainctl.contract.names import shell_path
from trainctl.contract.records import RunState
from trainctl.contract.protocol import read_heartbeat
from trainctl.contract.runfolder import EVIDENCE_DIR, STATE_FILE, SUPERVISOR_LOCK, read_json


class AlreadyRunning(RuntimeError):
    """Another supervisor holds this run."""


# `supervisor_alive` probes by taking the lock for an instant; a start that tries at that instant must
# not be refused, so it waits this long for a holder to go (a real supervisor holds it for the run).
PROBE_WAIT_SECONDS = 2.0
START_TIME_TOLERANCE = 0.5     # seconds: psutil's create_time of one process, read twice, differs by less


class RunLock:
    """The run's supervisor lock as held, with the identity (device, inode) of the file that was locked:
    a lock file deleted or replaced by hand no longer protects anything, and `retake` notices."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / SUPERVISOR_LOCK
        self.lock = filelock.FileLock(self.path)
        self.identity: tuple[int, int] | None = None

    def acquire(self, timeout: float) -> None:
        self.lock.acquire(timeout=timeout, poll_interval=0.01)
        self.identity = fsio.file_identity(self.path)

    def release(self) -> None:
        self.lock.release()

    def retake(self) -> str | None:
        """None while the file at the lock's path is the one held; else lock a new one and say what happened."""
        if self.identity is not None and fsio.file_identity(self.path) == self.identity:
            return None
        fresh = RunLock(self.path.parent)
        try:
            fresh.acquire(timeout=0)
        except (filelock.Timeout, OSError) as e:
            return (f"{self.path.name} was deleted or replaced and could not be taken again ({type(e).__name__}); "
                    f"this supervisor is still known by its pid and start time in state.json")
        self.lock.release()
        self.lock, self.identity = fresh.lock, fresh.identity
        return f"{self.path.name} was deleted or replaced while the run was supervised: created and taken again"


def acquire(run_dir: Path, timeout: float = PROBE_WAIT_SECONDS) -> RunLock:
    """Take the run's supervisor lock or raise AlreadyRunning naming the holder's pid."""
    lock = RunLock(run_dir)
    try:
        lock.acquire(timeout)
    except filelock.Timeout:
        pid = getattr(read_state(run_dir), "supervisor_pid", None)
        raise AlreadyRunning(f"run {Path(run_dir).name} already has a supervisor running"
                             f"{f' (pid {pid})' if pid else ''}; see: trainctl status {shell_path(run_dir)}") from None
    return lock


def acquire_alone(run_dir: Path, timeout: float = PROBE_WAIT_SECONDS) -> RunLock:
    """`acquire`, and also refuse while the supervisor state.json names is alive (its lock file deleted by hand)."""
    lock = acquire(run_dir, timeout)
    other = recorded_supervisor(run_dir)
    if other is not None and other != os.getpid():
        lock.release()
        raise AlreadyRunning(f"run {Path(run_dir).name} already has a supervisor running (pid {other}; its "
                             f"{SUPERVISOR_LOCK} was deleted); see: trainctl status {shell_path(run_dir)}")
    return lock


def supervisor_alive(run_dir: Path) -> bool:
    """True while some process holds the run's supervisor lock, or the supervisor state.json names is alive."""
    return lock_held(run_dir) or recorded_supervisor(run_dir) is not None


def lock_held(run_dir: Path) -> bool:
    """True while some process holds the run's supervisor lock file."""
    return held(Path(run_dir) / SUPERVISOR_LOCK)


def held(path: Path) -> bool:
    """True while some process holds the lock file at `path` (probed by taking it for an instant)."""
    if not path.exists():
        return False
    probe = filelock.FileLock(path)
    try:
        probe.acquire(timeout=0)
    except filelock.Timeout:
        return True
    probe.release()
    return False


def recorded_supervisor(run_dir: Path) -> int | None:
    """The pid of the supervisor state.json names, while that very process (pid and start time) is alive, not a
    zombie, and has not recorded the run's end; else None."""
    saved = read_state(run_dir)
    if (saved is None or saved.state.final or not isinstance(saved.supervisor_pid, int)
            or not isinstance(saved.supervisor_started, (int, float))):
        return None
    try:
        proc = psutil.Process(saved.supervisor_pid)
        same = abs(proc.create_time() - saved.supervisor_started) < START_TIME_TOLERANCE
        if not same or proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return saved.supervisor_pid


def own_start_time() -> float:
    """This process's psutil create_time, which state.json records beside its pid."""
    return psutil.Process().create_time()


EVIDENCE_NAME = re.compile(r"^attempt-(\d+)\.")


def last_attempt_seen(run_dir: Path) -> int:
    """The highest attempt number the run folder shows outside state.json and the journal: its evidence files
    (evidence/attempt-NNN.*) and its heartbeat; 0 when none."""
    try:
        names = os.listdir(Path(run_dir) / EVIDENCE_DIR)
    except OSError:
        names = []
    numbers = [int(m.group(1)) for name in names if (m := EVIDENCE_NAME.match(name))]
    hb = read_heartbeat(run_dir)
    if hb is not None and isinstance(hb.attempt, int):
        numbers.append(hb.attempt)
    return max(numbers, default=0)


def read_state(run_dir: Path) -> RunState | None:
    """The run's state.json, or None (never written, half-written, or not ours)."""
    data = read_json(Path(run_dir) / STATE_FILE)
    return RunState.from_json(data) if data is not None else None


def write_state(run_dir: Path, state: RunState, durable: bool = True) -> None:
    """Atomically replace state.json; `updated_at` is the supervisor's 'last seen' for status."""
    fsio.atomic_write_json(Path(run_dir) / STATE_FILE,
                           dataclasses.replace(state, updated_at=time.time()).to_json(), durable)
