"""The run's lifecycle: its states and the transitions between them, the journal's event kinds, kill reasons.

::

                 ┌───────────── worker exits, policy says restart / step down ─────────────┐
                 ▼                                                                          │
    STARTING ──▶ RUNNING ──▶ (worker exit) ──▶ BACKOFF ──(delay over)──▶ STARTING          │
       │            │                             │                                         │
       │            │  stop request               │ stop request                            │
       │            ▼                             ▼                                         │
       └──────▶ STOPPING ──▶ STOPPED           STOPPED                                      │
                                                                                            │
    STARTING / RUNNING ──(done)──▶ SUCCEEDED                                                │
    STARTING / RUNNING / BACKOFF ──(policy gives up)──▶ FAILED                              │
    STARTING ──(worker exits before training)──▶ BACKOFF ───────────────────────────────────┘

STARTING: a worker is booting (imports, model, checkpoint load, sanity check).
RUNNING: the worker trains. BACKOFF: waiting before the next attempt.
STOPPING: a stop was asked; the worker is checkpointing. STOPPED, SUCCEEDED, FAILED: final
for this supervisor (STOPPED and FAILED runs can be resumed).
"""
from __future__ import annotations

from enum import Enum


class State(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        """Nothing more happens under this supervisor (STOPPED and FAILED runs can be resumed)."""
        return self in (State.STOPPED, State.SUCCEEDED, State.FAILED)


def is_final(value: str | None) -> bool:
    """`State.final` for a state as read from a file (None or unknown: not final)."""
    try:
        return State(value).final
    except ValueError:
        return False


ALLOWED = {
    State.STARTING: {State.RUNNING, State.BACKOFF, State.STOPPING, State.STOPPED, State.SUCCEEDED, State.FAILED},
    State.RUNNING: {State.BACKOFF, State.STOPPING, State.STOPPED, State.SUCCEEDED, State.FAILED},
    State.BACKOFF: {State.STARTING, State.STOPPED, State.FAILED},
    State.STOPPING: {State.STOPPED, State.SUCCEEDED, State.FAILED},
    State.STOPPED: set(),
    State.SUCCEEDED: set(),
    State.FAILED: set(),
}


class BadTransition(RuntimeError):
    pass


def check_transition(old: State, new: State) -> None:
    """Raise when `old → new` is not in the diagram above (a supervisor bug, never user input)."""
    if new not in ALLOWED[old]:
        raise BadTransition(f"illegal lifecycle transition {old.value} -> {new.value}")


class Event(str, Enum):
    """The kinds of event in the run's journal (journal.sqlite3), each with its own JSON details."""
    SUPERVISOR_START = "supervisor_start"     # a supervisor took the run: pid, python
    START_RUNG = "start_rung"                 # a new run starts below its first rung (rung memory): reason
    SUPERVISOR_ERROR = "supervisor_error"     # the supervisor itself failed: traceback, what it did then
    JOURNAL_RESET = "journal_reset"           # the journal was damaged, deleted or replaced: reason, kept (its old file)
    BUDGET_RESET = "budget_reset"             # a person resumed: the restart budget starts afresh
    ORPHAN = "orphan"                         # a previous supervisor's worker: pid, killed
    STATE = "state"                           # a lifecycle transition: from, to, reason
    SPAWN = "spawn"                           # an attempt began: pid, rung; step = its checkpoint's
    WORKER_READY = "worker_ready"             # it passed the sanity check: device, skipped_checkpoints
    CHECKPOINT = "checkpoint"                 # a commit seen in the heartbeat: path, taken (at failure: reason, failure)
    CHECKPOINT_REQUESTED = "checkpoint_requested"
    HANG_DETECTED = "hang_detected"           # phase, silent_seconds
    MEMORY_SOFT_LIMIT = "memory_soft_limit"   # worker, limit (bytes)
    MEMORY_HARD_LIMIT = "memory_hard_limit"
    MEMORY_PRESSURE = "memory_pressure"       # the system's pressure level changed: level, source, figures, action
    RECYCLE = "recycle"                       # a planned restart on the same rung: worker, baseline, growth, limit
    EXIT = "exit"                             # an attempt ended: failure kind, signal, exit code, evidence...
    RESTART = "restart"                       # delay, reason
    STEP_DOWN = "step_down"                   # from, to (0-based rung indices), reason, same_step, after_step_up
    STEP_UP = "step_up"                       # from, to, reason: a planned climb after stable progress
    GIVE_UP = "give_up"                       # reason, evidence
    FINISH = "finish"                         # model
    HOOK = "hook"                             # command, exit_code


class Kill(str, Enum):
    """Why the supervisor itself ended (or began to end) a worker."""
    STOP = "stop"                   # a stop was requested: SIGTERM, it checkpoints and exits
    HANG = "hang"                   # no progress: SIGABRT for the stacks, then SIGKILL
    MEMORY_SOFT = "memory_soft"     # past the soft limit: SIGTERM, it checkpoints, next rung
    MEMORY_HARD = "memory_hard"     # past the hard limit: SIGKILL at once
    MEMORY_PRESSURE = "memory_pressure"   # the system's memory pressure critical: SIGTERM, it checkpoints, next rung
    RECYCLE = "recycle"             # its memory grew past recycle_growth: SIGTERM, it checkpoints, a fresh one, same rung
    STEP_UP = "step_up"             # stable long enough on a lower rung: SIGTERM, it checkpoints, the rung above
