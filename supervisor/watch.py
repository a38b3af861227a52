"""Watching one attempt: what to do about what was seen, as a pure function (`assess`), tested with tables.

The loop looks (the worker's heartbeat, a memory sample, the requests that arrived, its clock) and
asks `assess`, which returns the attempt's new `Watch` and the commands to carry out: signal the
worker, kill its group, enter a lifecycle state, journal an event, say a line, talk to the service
manager, touch state.json, start a standby. The verdicts — hang (during boot: the startup timeout),
soft and hard memory limits, stop and checkpoint requests, the kill deadline, the watchdog ping only
while the run makes progress — are all made here, and nowhere else.
"""
from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass, field

from trainctl.contract.config import Config, parse_memory_limit
from trainctl.contract.lifecycle import Event, Kill, State
from trainctl.contract.protocol import Heartbeat, Phase

from .classify import MemorySample

ABORT_GRACE_SECONDS = 5.0      # after SIGABRT, time for faulthandler to write the stacks
TOUCH_SECONDS = 5.0            # state.json is rewritten at least this often while a worker runs


@dataclass(frozen=True)
class Limits:
    """The thresholds of one run, from its config."""
    hang_timeout: float
    startup_timeout: float
    stop_timeout: float
    soft_limit: int | None = None     # bytes of worker memory
    hard_limit: int | None = None
    warm_standby: bool = False

    @classmethod
    def of(cls, cfg: Config, total_memory: int) -> Limits:
        s = cfg.supervisor
        return cls(s.hang_timeout_seconds, s.startup_timeout_seconds, s.stop_timeout_seconds,
                   parse_memory_limit(s.memory_soft_limit, total_memory),
                   parse_memory_limit(s.memory_hard_limit, total_memory), s.warm_standby)


@dataclass(frozen=True)
class Watch:
    """What the loop knows about the attempt in flight (the supervisor's monotonic clock throughout)."""
    attempt: int
    rung_index: int
    rung_text: str                        # "cpu batch 4 x accum 4"
    restarts: int
    start_step: int
    last_progress_at: float               # when a new beat last arrived (or the attempt began)
    touched_at: float                     # when state.json was last written
    beat: int | None = None
    heartbeat: Heartbeat | None = None
    ready: bool = False                   # passed its sanity check
    checkpoint_step: int | None = None    # the newest commit journaled
    fresh_beat: bool = False              # a beat arrived since the last watchdog ping
    kill: Kill | None = None
    kill_deadline: float | None = None
    stop_sent: bool = False


@dataclass(frozen=True)
class Seen:
    """One look at the world."""
    now: float
    heartbeat: Heartbeat | None = None    # this attempt's newest, when readable
    memory: MemorySample | None = None
    stop_requested: bool = False
    checkpoint_requested: bool = False    # a request that arrived since the last look
    state: State = State.STARTING
    has_standby: bool = False


# ---- commands: what the loop carries out, in order -----------------------------------------------
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


def assess(w: Watch, seen: Seen, limits: Limits) -> tuple[Watch, list[Command]]:
    """The attempt's new Watch and what to do, after one look at a running worker."""
    w, out = take_heartbeat(w, seen, limits)
    state = next((c.state for c in reversed(out) if isinstance(c, Enter)), seen.state)
    now = seen.now
    if seen.memory is not None and w.kill not in (Kill.HANG, Kill.MEMORY_HARD):
        w = _judge_memory(w, seen.memory.worker, now, limits, out)
    if w.kill is None:
        w = _judge_hang(w, now, limits, out)
    if seen.stop_requested and not w.stop_sent:
        if state in (State.STARTING, State.RUNNING):
            out.append(Enter(State.STOPPING, "stop requested"))
            state = State.STOPPING
        # SIGCONT too: a stopped (SIGSTOP, Ctrl-Z) worker must run to take the SIGTERM, or the stop waits it out
        out += [Say("stop requested: asking the worker to checkpoint and exit"), Send(signal.SIGTERM),
                Send(signal.SIGCONT)]
        w = dataclasses.replace(w, stop_sent=True, kill=w.kill or Kill.STOP,
                                kill_deadline=w.kill_deadline or now + limits.stop_timeout)
    if seen.checkpoint_requested:
        out += [Send(signal.SIGUSR1), Record(Event.CHECKPOINT_REQUESTED)]
    if w.kill_deadline is not None and now >= w.kill_deadline:
        out += [Say("the worker did not exit in time: killing its process group"), KillGroup()]
        w = dataclasses.replace(w, kill_deadline=None)
    if any(isinstance(c, Enter) for c in out):
        w = dataclasses.replace(w, touched_at=now)        # entering a state writes state.json
    elif now - w.touched_at >= TOUCH_SECONDS:
        out.append(Touch())
        w = dataclasses.replace(w, touched_at=now)
    return _tell_service_manager(w, state, now, limits, out)


def take_heartbeat(w: Watch, seen: Seen, limits: Limits) -> tuple[Watch, list[Command]]:
    """Progress, readiness and new checkpoints from the attempt's heartbeat (also its last one, after it exited)."""
    hb, out = seen.heartbeat, []
    if hb is None or hb.attempt != w.attempt:
        return w, out
    w = dataclasses.replace(w, heartbeat=hb)
    if hb.beat != w.beat:
        w = dataclasses.replace(w, beat=hb.beat, last_progress_at=seen.now, fresh_beat=True)
    if hb.phase.booted and not w.ready:
        w = dataclasses.replace(w, ready=True)
        out.append(Record(Event.WORKER_READY, hb.step, {"device": hb.device,
                                                        "skipped_checkpoints": hb.skipped_checkpoints}))
        if seen.state is State.STARTING:
            out.append(Enter(State.RUNNING))
        out.append(Ready(status_line(w, State.RUNNING if seen.state is State.STARTING else seen.state)))
        if limits.warm_standby and not seen.has_standby:
            out.append(StartStandby())
    ckpt = hb.last_checkpoint or {}
    if ckpt.get("step") is not None and ckpt["step"] != w.checkpoint_step:
        w = dataclasses.replace(w, checkpoint_step=ckpt["step"])
        out.append(Record(Event.CHECKPOINT, ckpt["step"], {"path": ckpt.get("path"), "taken": ckpt.get("taken")}))
    return w, out


def _judge_memory(w: Watch, used: int, now: float, limits: Limits, out: list) -> Watch:
    if limits.hard_limit and used >= limits.hard_limit:
        out += [Record(Event.MEMORY_HARD_LIMIT, data={"worker": used, "limit": limits.hard_limit}),
                Say(f"worker memory {used / 2**30:.2f} GiB is past the hard limit: killing it"), KillGroup()]
        return dataclasses.replace(w, kill=Kill.MEMORY_HARD)
    if limits.soft_limit and used >= limits.soft_limit and w.kill is None:
        out += [Record(Event.MEMORY_SOFT_LIMIT, data={"worker": used, "limit": limits.soft_limit}),
                Say(f"worker memory {used / 2**30:.2f} GiB is past the soft limit: checkpoint and stop, "
                    f"then continue on the next rung"), Send(signal.SIGTERM)]
        return dataclasses.replace(w, kill=Kill.MEMORY_SOFT, kill_deadline=now + limits.stop_timeout)
    return w


def _judge_hang(w: Watch, now: float, limits: Limits, out: list) -> Watch:
    """No new beat within the timeout of the phase (booting gets the startup timeout): stacks, then kill."""
    phase = w.heartbeat.phase if w.heartbeat else Phase.BOOTING
    limit = limits.hang_timeout if phase.booted else limits.startup_timeout
    silent = now - w.last_progress_at
    if silent < limit:
        return w
    step = w.heartbeat.step if w.heartbeat else None
    out += [Record(Event.HANG_DETECTED, step, {"phase": phase.value, "silent_seconds": round(silent, 1)}),
            Say(f"no progress for {silent:.0f} s (phase {phase.value}): SIGABRT for the stacks, then SIGKILL"),
            Send(signal.SIGABRT), Send(signal.SIGCONT)]   # a stopped (SIGSTOP) process must run to take the SIGABRT
    return dataclasses.replace(w, kill=Kill.HANG, kill_deadline=now + ABORT_GRACE_SECONDS)


def _tell_service_manager(w: Watch, state: State, now: float, limits: Limits,
                          out: list) -> tuple[Watch, list[Command]]:
    """A status line once ready; WATCHDOG only while healthy: training, a new beat since the last ping;
    booting, still within the startup timeout; never once trainctl has begun to end the worker."""
    if w.ready:
        out.append(Tell(status_line(w, state)))
    if w.kill is not None:
        healthy = False
    elif w.ready and w.heartbeat is not None and w.heartbeat.phase.booted:
        healthy = w.fresh_beat
        w = dataclasses.replace(w, fresh_beat=False)
    else:
        healthy = now - w.last_progress_at < limits.startup_timeout
    if healthy:
        out.append(Ping())
    return w, out


def status_line(w: Watch, state: State) -> str:
    """The service manager's one-line status."""
    hb = w.heartbeat
    if hb is None:
        return f"{state.value} | rung {w.rung_index + 1} ({w.rung_text}) | restarts {w.restarts}"
    loss = f" loss {hb.loss:.4f}" if isinstance(hb.loss, (int, float)) else ""
    return (f"{state.value}: epoch {hb.epoch + 1}/{hb.epochs or '?'} step {hb.step}/{hb.total_steps or '?'}{loss}"
            f" | rung {w.rung_index + 1} ({w.rung_text}) | restarts {w.restarts}")
