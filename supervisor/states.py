"""The run's lifecycle states and the transitions allowed between them.

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
        return self in (State.STOPPED, State.SUCCEEDED, State.FAILED)


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
