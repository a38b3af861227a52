"""What the supervisor loop carries out, in order: the answers of the pure core (`watch.assess`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from trainctl.contract.lifecycle import Event, State


@dataclass(frozen=True)
class Send:
    signal: int                           # to the worker process


@dataclass(frozen=True)
class KillGroup:
    """SIGKILL the worker's whole process group."""


@dataclass(frozen=True)
class Enter:
    state: State
    reason: str | None = None


@dataclass(frozen=True)
class Record:
    event: Event
    step: int | None = None
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Say:
    message: str


@dataclass(frozen=True)
class Ready:
    status: str                           # READY=1 to the service manager (once per supervisor)


@dataclass(frozen=True)
class Tell:
    status: str                           # STATUS= to the service manager


@dataclass(frozen=True)
class Ping:
    """WATCHDOG=1: the run makes progress."""


@dataclass(frozen=True)
class Touch:
    """Rewrite state.json (status's 'last seen'), rotate logs, check the sleep inhibitor."""


@dataclass(frozen=True)
class StartStandby:
    """Boot the next worker now, so it is warm when a crash comes."""


Command = Send | KillGroup | Enter | Record | Say | Ready | Tell | Ping | Touch | StartStandby
