"""The records people and scripts read: state.json (`RunState`) and `trainctl status --json` (`Status`).

Rungs are counted from 1 wherever people see them (`Status.rung.number`, `Crash.rung`); `RunState`
keeps the supervisor's 0-based index into the ladder.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .lifecycle import State


@dataclass(frozen=True)
class RunState:
    """state.json: what the supervisor is doing now; rewritten atomically on every change and every few seconds."""
    state: State
    reason: str | None = None
    run_name: str = ""
    supervisor_pid: int | None = None
    supervisor_started: float | None = None    # its psutil create_time: with the pid, who it is (pids are reused)
    worker_pid: int | None = None
    rung_index: int = 0
    rung: dict = field(default_factory=dict)    # the rung's profile: device, batch_size, precision, ...
    grad_accum: int | None = None
    ladder_size: int | None = None
    attempt: int = 0
    restarts: int = 0
    memory: dict | None = None                  # the latest memory sample (bytes): worker, available, total, ...
    hang_timeout: dict | None = None            # in force: {"seconds": 30.0, "how": "auto: floor 30 s"}
    startup_timeout: dict | None = None         # the start-up allowance in force, the same way
    updated_at: float | None = None             # wall clock: the supervisor's "last seen" for status

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "state": self.state.value}

    @classmethod
    def from_json(cls, d: dict) -> RunState | None:
        """A RunState from state.json's object; None when it is not one. Reads 0.1's key names too."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = {**d, "rung_index": d.get("rung_index", d.get("profile_index", 0)),
             "rung": d.get("rung", d.get("profile")) or {}}
        try:
            return cls(**{**{k: v for k, v in d.items() if k in known}, "state": State(d.get("state"))})
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class RungStatus:
    number: int | None = None       # 1 = the first rung of the ladder
    of: int | None = None           # rungs in the ladder
    device: str | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    nproc_per_node: int | None = None   # a group's processes (nproc_per_node > 1)


@dataclass(frozen=True)
class Crash:
    at: str                         # local time, ISO 8601
    kind: str                       # a failure kind (README: 'Crash kinds')
    signal: str | None
    exit_code: int | None
    rung: int                       # 1-based
    step: int | None
    detail: str | None = None
    evidence: str | None = None     # the file with the traceback or faulthandler output
    rank: int | None = None         # a group's attempt: the rank that failed first (worker/group.py)


@dataclass(frozen=True)
class CheckpointStatus:
    step: int
    path: str
    age_seconds: float
    at_failure: str | None = None   # "exception at step 1234": written on the way out of a caught failure


@dataclass(frozen=True)
class Status:
    """Everything `trainctl status` says, from the run folder alone (supervisor alive or not)."""
    run_name: str
    run_dir: str
    state: str                      # a State's value; "stopped" when the supervisor died mid-run
    reason: str | None
    supervisor_alive: bool
    supervisor_pid: int | None
    worker_pid: int | None
    updated_at: float | None
    last_seen_seconds: float | None
    rung: RungStatus
    phase: str | None
    step: int
    total_steps: int | None
    epoch: int | None               # 0-based
    epochs: int | None
    samples_seen: int
    loss: float | None
    lr: float | None
    images_per_sec: float | None
    val_acc: float | None
    eta_seconds: float | None
    memory: dict
    restarts: int
    crashes: list[Crash]
    last_checkpoint: CheckpointStatus | None
    final_model: str | None
    bad_images: int
    report: str | None
    summary: dict | None
    recorded_state: str | None = None   # what the dead supervisor last recorded, when state says otherwise
    metrics: dict = field(default_factory=dict)   # recent losses and accuracies, for the live view only
    # checkpoints that failed verification, moved into checkpoints/corrupt/: {file, step, reason, time}
    set_aside_checkpoints: list = field(default_factory=list)
    hang_timeout: dict | None = None      # the hang timeout in force (or last in force): {"seconds", "how"}
    startup_timeout: dict | None = None   # the start-up allowance, the same way
    val_top5: float | None = None         # the latest validation's top-5 (more than 5 classes only)
    ema_val_acc: float | None = None      # [ema] enabled: the EMA's top-1 of the latest validation
    ranks: list = field(default_factory=list)   # a group's processes while they run: [{"rank", "pid", "device", "port"}]

    def to_json(self) -> dict:
        """The `trainctl status --json` object (without the recent metrics); strict JSON: NaN and inf are null."""
        out = dataclasses.asdict(self)
        out.pop("metrics")
        return finite_only(out)


def finite_only(obj):
    """`obj` with every NaN and infinity replaced by None: JSON has no NaN (a diverged run's loss is one)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_only(v) for v in obj]
    return obj
