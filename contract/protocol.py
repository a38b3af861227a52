"""The process contract: how a worker is started, signalled and heard from, and every exit code.

Start: ``python -m trainctl.worker --run-dir DIR --rung N --attempt K`` (N counts from 1, as people
count rungs) in a new session, so one signal reaches its DataLoader processes too.
Signals to the worker (handlers only set flags):
  SIGTERM  finish the current optimiser step, checkpoint, exit ``ExitCode.STOPPED``.
  SIGUSR1  checkpoint as soon as the current optimiser step ends, keep training.
Evidence: ``faulthandler`` writes native-crash tracebacks to ``evidence/attempt-K.fault.log``;
a Python exception is written as JSON to ``evidence/attempt-K.error.json`` before exit.
Progress: ``heartbeat.json`` (atomic, not fsynced), a `Heartbeat`; ``beat`` grows with every
micro-batch, so a worker whose main thread is stuck stops beating. Times in it are informative
only: the supervisor timestamps changes with its own monotonic clock.
Orphans: the worker polls its parent pid (``ENV_SUPERVISOR_PID``); when the supervisor is gone it
checkpoints and stops, and hard-exits after ``ORPHAN_GRACE_SECONDS`` if the step does not end.
Exclusion: the worker holds ``worker.lock`` for its whole life; a second worker on a run exits
with ``ExitCode.LOCKED`` before touching anything.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from pathlib import Path

from .runfolder import HEARTBEAT_FILE, read_json


class ExitCode(IntEnum):
    """Every exit code of every trainctl process, in one table (README: 'Exit codes')."""
    OK = 0                # all: succeeded, stopped on request, or nothing to do; the worker: training done
    FAILED = 1            # CLI, supervisor: the run failed, the policy gave up (a person must look)
    USAGE = 2             # CLI, supervisor, worker: a bad command line (argparse's own code), an ambiguous run name
    BAD_CONFIG = 3        # CLI, supervisor: bad config or data
    NOT_FOUND = 4         # CLI: no such run
    RUNNING = 5           # CLI, supervisor: refused, another supervisor holds the run
    REFUSED = 6           # CLI: refused, the run's state does not allow it
    TIMEOUT = 7           # CLI: timed out waiting
    CANNOT_CONTINUE = 65  # worker: the run cannot go on as it is (see `CannotContinue`); restarting will not help
    INTERNAL_ERROR = 70   # supervisor, worker: an uncaught exception (EX_SOFTWARE); evidence kept, restart it
    DISK_FULL = 74        # worker: no space for a checkpoint; the previous one is intact
    STOPPED = 75          # worker: stopped on request after writing a checkpoint
    OUT_OF_MEMORY = 77    # worker: a caught out-of-memory error (CUDA, MPS or CPU allocator)
    CONFIG_ERROR = 78     # worker: bad config or data, restarting will not help
    LOCKED = 79           # worker: another worker holds this run
    INTERRUPTED = 130     # CLI: Ctrl-C


class CannotContinue(RuntimeError):
    """The worker's verdict that training must not go on until a person looks: it exits
    `ExitCode.CANNOT_CONTINUE` with `kind` in its error JSON, and the supervisor gives up with `str(self)`."""
    KINDS = ("diverged", "data_error", "no_checkpoint")   # the supervisor's failure kinds of the same names

    def __init__(self, kind: str, message: str):
        assert kind in self.KINDS, kind
        super().__init__(message)
        self.kind = kind


# Environment passed from supervisor to worker.
ENV_SUPERVISOR_PID = "TRAINCTL_SUPERVISOR_PID"
ENV_FAULTS = "TRAINCTL_FAULTS"           # test-only fault injection, inert when unset
ORPHAN_GRACE_SECONDS = 30.0
# Set for every worker before torch loads: unsupported MPS ops fall back to the CPU instead of dying.
WORKER_ENV = {"PYTORCH_ENABLE_MPS_FALLBACK": "1", "PYTHONUNBUFFERED": "1"}


class Phase(str, Enum):
    """Heartbeat phases, in the order a healthy worker goes through them."""
    BOOTING = "booting"
    LOADING = "loading"
    SANITY = "sanity"
    TRAINING = "training"
    VALIDATING = "validating"
    EXPORTING = "exporting"
    DONE = "done"

    @property
    def booted(self) -> bool:
        """Past the sanity check: the worker trains (or validates, exports) now."""
        return self not in (Phase.BOOTING, Phase.LOADING, Phase.SANITY)


@dataclass(frozen=True)
class Heartbeat:
    """heartbeat.json: the worker's latest word. Written by `worker.report.Reporter`, read by the supervisor."""
    pid: int
    attempt: int
    rung_index: int                       # 0-based index into the ladder (people see rung_index + 1)
    beat: int                             # grows with every micro-batch: the proof of life
    phase: Phase
    time: float | None = None             # wall clock when written (informative only)
    step: int = 0                         # optimizer steps done
    epoch: int = 0                        # 0-based
    cursor: int = 0                       # samples consumed in the current epoch
    samples_seen: int = 0
    epochs: int | None = None
    total_steps: int | None = None
    steps_per_epoch: int | None = None
    device: str | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    effective_batch_size: int | None = None
    loss: float | None = None
    lr: float | None = None
    images_per_sec: float | None = None
    val_acc: float | None = None
    val_top5: float | None = None   # with more than 5 classes
    ema_val_acc: float | None = None   # [ema] enabled: the EMA's top-1 of the same validation
    skipped_checkpoints: list = field(default_factory=list)
    checkpoints_written: int = 0
    checkpoint_blocked_seconds: float = 0.0
    checkpoint_write_seconds: float = 0.0   # the latest checkpoint write's duration (the hang allowance of writes)
    last_checkpoint: dict | None = None   # {"step", "path", "time", "taken"} of the newest commit
    bad_images: int = 0
    nonfinite_steps: int = 0              # optimizer steps skipped because their loss was not finite
    final_model: str | None = None
    timings: dict = field(default_factory=dict)   # wall-clock moments of the start-up (bench/recovery.py)
    memory: dict = field(default_factory=dict)    # device memory the worker reports: mps_driver_allocated, ...
    ranks: list = field(default_factory=list)     # a group (nproc_per_node > 1): [{"rank", "pid", "device"}], by rank 0

    @classmethod
    def from_json(cls, d: dict) -> Heartbeat | None:
        """A heartbeat from its JSON object, or None when it is not one (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{**{k: v for k, v in d.items() if k in known}, "phase": Phase(d.get("phase"))})
        except (TypeError, ValueError):
            return None

    @property
    def device_memory(self) -> int:
        """Accelerator memory RSS does not show (MPS driver memory), in bytes."""
        return int(self.memory.get("mps_driver_allocated", 0) or 0)


HEARTBEAT_FIELDS = frozenset(f.name for f in dataclasses.fields(Heartbeat))


def ranks_of(pid: int) -> list:
    """The worker processes (ranks) that torchrun's agent `pid` started, each in a session of its own
    (worker/group.py); the supervisor signals and kills them (supervisor/process.GroupProcess)."""
    import psutil   # here, not at the top: the contract's other readers need no process table
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    found = []
    for p in children:
        try:
            if "trainctl.worker" in p.cmdline():
                found.append(p)
        except psutil.Error:
            pass
    return found


def read_heartbeat(run_dir: Path) -> Heartbeat | None:
    """The worker's latest heartbeat, or None (missing, half-written, or not a heartbeat)."""
    data = read_json(Path(run_dir) / HEARTBEAT_FILE)
    return Heartbeat.from_json(data) if data is not None else None
