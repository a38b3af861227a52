"""Watching one attempt: what to do about what was seen, as a pure function (`assess`), tested with tables.

The loop looks (the worker's heartbeat, a memory sample, the requests that arrived, its clock) and
asks `assess`, which returns the attempt's new `Watch` and the commands to carry out: signal the
worker, kill its group, enter a lifecycle state, journal an event, say a line, talk to the service
manager, touch state.json, start a standby (`commands.py`). The verdicts — hang (during boot: the startup
timeout), memory (our soft and hard limits, the system's pressure, a leaking worker's recycle:
`memory_watch.py`, called from here), the planned climb to the rung above (`step_up_after`), stop and
checkpoint requests, the kill deadline, the watchdog ping only while the run makes progress — are all
made here, and nowhere else.

Hang timeouts calibrate themselves ("auto", the default): the silence allowed while training is
HANG_MULTIPLE times the slowest of the recent optimizer steps, or of the checkpoint writes, or (while
validating) of the silences seen in validation, never below HANG_FLOOR_SECONDS; the start-up allowance
is STARTUP_MULTIPLE times the run's slowest previous boot (spawn to ready). Steps are timed with the
supervisor's clock (the time between step changes seen at its polls: poll resolution, far finer than
the floor). What was learned (`Pace`) is journaled and recalled by a restarted supervisor. A number
in the config wins.
"""
from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass
from typing import Any

from trainctl.contract.config import Config, parse_duration, parse_growth, parse_memory_limit
from trainctl.contract.lifecycle import Event, Kill, State
from trainctl.contract.protocol import Heartbeat, Phase

from .classify import MemorySample
from .commands import Command, Enter, KillGroup, Ping, Ready, Record, Say, Send, StartStandby, Tell, Touch
from .memory_watch import NORMAL, judge_growth, judge_limits, judge_pressure

ABORT_GRACE_SECONDS = 5.0      # after SIGABRT, time for faulthandler to write the stacks
TOUCH_SECONDS = 5.0            # state.json is rewritten at least this often while a worker runs
# NVIDIA's resiliency tooling allows 5x the observed interval. The floor absorbs what no step shows:
# a GC pause, a checkpoint write or validation starting, a loaded machine; a hung worker with fast
# steps is still caught in about half a minute, not five.
HANG_MULTIPLE = 5.0
HANG_FLOOR_SECONDS = 30.0
STARTUP_MULTIPLE = 5.0         # boots vary more (a cold disk cache after a reboot), hence the floor
STARTUP_FLOOR_SECONDS = 120.0
STARTUP_DEFAULT_SECONDS = 900.0   # no boot of this run seen yet
RECENT_STEPS = 20              # "the slowest recent step": of the last this many
RECENT_BOOTS = 10
WARMUP_STEPS = 2               # an attempt's first steps (loader start, allocations) get the start-up allowance


@dataclass(frozen=True)
class Pace:
    """How fast this run's workers have shown themselves to be (seconds, the supervisor's clock; the checkpoint
    writes as the worker timed them). Journaled with checkpoints and exits; `recall_pace` reads it back."""
    steps: tuple[float, ...] = ()      # the latest gaps between step changes, oldest first
    checkpoint: float = 0.0            # the slowest checkpoint write
    validation: float = 0.0            # the longest silence seen while validating
    boots: tuple[float, ...] = ()      # spawn → ready of the latest attempts

    def to_json(self) -> dict:
        return {"steps": list(self.steps), "checkpoint": self.checkpoint, "validation": self.validation,
                "boots": list(self.boots)}

    @classmethod
    def from_json(cls, d: Any) -> Pace:
        """A Pace from its journaled object; an empty one when it is not one (an older journal)."""
        try:
            return cls(tuple(float(x) for x in d.get("steps", ()))[-RECENT_STEPS:], float(d.get("checkpoint", 0.0)),
                       float(d.get("validation", 0.0)), tuple(float(x) for x in d.get("boots", ()))[-RECENT_BOOTS:])
        except (AttributeError, TypeError, ValueError):
            return cls()


def recall_pace(events: list[dict]) -> Pace:
    """The newest pace journaled (with a checkpoint, a worker's readiness or an exit), oldest events first."""
    found = [e["data"]["pace"] for e in events if isinstance(e.get("data"), dict) and "pace" in e["data"]]
    return Pace.from_json(found[-1]) if found else Pace()


@dataclass(frozen=True)
class Limits:
    """The thresholds of one run, from its config (a timeout of None: "auto", learned from the run's pace)."""
    hang_timeout: float | None
    startup_timeout: float | None
    stop_timeout: float
    soft_limit: int | None = None     # bytes of worker memory
    hard_limit: int | None = None
    warm_standby: bool = False
    ladder_size: int = 1
    pressure: bool = False            # act on the system's memory pressure
    pressure_sustained: float = 0.0   # seconds of warning that count as critical (0: never)
    recycle_bytes: int | None = None  # recycle_growth as a size ...
    recycle_share: float | None = None   # ... or as a share of the first steps' footprint
    step_up_after: float | None = None   # seconds of stable progress on a lower rung before trying the one above

    @classmethod
    def of(cls, cfg: Config, total_memory: int) -> Limits:
        s = cfg.supervisor
        recycle_bytes, recycle_share = parse_growth(s.recycle_growth)
        return cls(_fixed(s.hang_timeout_seconds), _fixed(s.startup_timeout_seconds), s.stop_timeout_seconds,
                   parse_memory_limit(s.memory_soft_limit, total_memory),
                   parse_memory_limit(s.memory_hard_limit, total_memory), s.warm_standby, len(cfg.profiles),
                   s.memory_pressure, s.memory_pressure_sustained_seconds, recycle_bytes, recycle_share,
                   parse_duration(s.step_up_after))


def _fixed(value: float | str) -> float | None:
    return None if isinstance(value, str) else float(value)   # "auto": validated by config_rules


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
    started_at: float = 0.0               # when the attempt was spawned (its boot time is timed from here)
    pace: Pace = Pace()                   # the run's, this attempt's steps included
    step_seen: int | None = None          # the step of the newest beat, while training
    step_seen_at: float | None = None     # when that step was first seen (None: not timing, e.g. after validation)
    steps_timed: int = 0                  # this attempt's step gaps timed
    baseline: int = 0                     # the worker's memory over its first steps (what a leak grows from)
    pressure_level: str = NORMAL          # the system's pressure level last acted on
    pressure_since: float | None = None   # when the pressure rose above normal
    may_step_up: bool = True              # no rung climbed to has failed in this run


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


def assess(w: Watch, seen: Seen, limits: Limits) -> tuple[Watch, list[Command]]:
    """The attempt's new Watch and what to do, after one look at a running worker."""
    w, out = take_heartbeat(w, seen, limits)
    state = next((c.state for c in reversed(out) if isinstance(c, Enter)), seen.state)
    now = seen.now
    if seen.memory is not None and w.kill not in (Kill.HANG, Kill.MEMORY_HARD):
        w = judge_limits(w, seen.memory.worker, now, limits, out)
        w = judge_pressure(w, seen.memory.pressure, now, limits, out)
        w = judge_growth(w, seen.memory.worker, now, limits, out)
    if w.kill is None:
        w = _judge_hang(w, now, limits, out)
    if w.kill is None:
        w = _judge_step_up(w, now, limits, out)
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
    w = _time_pace(w, hb, seen.now)
    w = dataclasses.replace(w, heartbeat=hb)
    if hb.beat != w.beat:
        w = dataclasses.replace(w, beat=hb.beat, last_progress_at=seen.now, fresh_beat=True)
    if hb.phase.booted and not w.ready:
        boots = (w.pace.boots + (round(seen.now - w.started_at, 3),))[-RECENT_BOOTS:]
        w = dataclasses.replace(w, ready=True, pace=dataclasses.replace(w.pace, boots=boots))
        # ready_at: the worker's own moment (its clock is ours: one machine), not this poll's, which may come up to
        # a poll later while it already trains; the report's restart and start-up times are measured to it.
        ready_at = hb.timings.get("sanity_done") if isinstance(hb.timings, dict) else None
        out.append(Record(Event.WORKER_READY, hb.step, {"device": hb.device,
                                                        "skipped_checkpoints": hb.skipped_checkpoints,
                                                        "boot_seconds": boots[-1], "pace": w.pace.to_json(),
                                                        **({"ready_at": ready_at} if ready_at else {})}))
        if seen.state is State.STARTING:
            out.append(Enter(State.RUNNING))
        out.append(Ready(status_line(w, State.RUNNING if seen.state is State.STARTING else seen.state)))
        if limits.warm_standby and not seen.has_standby:
            out.append(StartStandby())
    ckpt = hb.last_checkpoint or {}
    if ckpt.get("step") is not None and ckpt["step"] != w.checkpoint_step:
        w = dataclasses.replace(w, checkpoint_step=ckpt["step"])
        seconds, how = hang_limit(w, limits)
        why = {"reason": ckpt["reason"]} if ckpt.get("reason") else {}   # interval, requested, stop, at_failure ...
        at_failure = {"failure": ckpt["failure"]} if ckpt.get("failure") else {}
        out.append(Record(Event.CHECKPOINT, ckpt["step"], {"path": ckpt.get("path"), "taken": ckpt.get("taken"),
                                                           **why, **at_failure, "pace": w.pace.to_json(),
                                                           "hang_timeout": {"seconds": seconds, "how": how}}))
    return w, out


def _time_pace(w: Watch, hb: Heartbeat, now: float) -> Watch:
    """Learn from one look: a step gap while training, a silence while validating, a checkpoint write's time."""
    pace = w.pace
    write = hb.checkpoint_write_seconds
    if isinstance(write, (int, float)) and write > pace.checkpoint:
        pace = dataclasses.replace(pace, checkpoint=round(float(write), 3))
    last = w.heartbeat
    if hb.beat != w.beat and last is not None and last.phase is Phase.VALIDATING:
        pace = dataclasses.replace(pace, validation=max(pace.validation, round(now - w.last_progress_at, 3)))
    if hb.phase is not Phase.TRAINING:   # a step that spans validation or boot is not a step's time
        return dataclasses.replace(w, pace=pace, step_seen=None, step_seen_at=None)
    if hb.step == w.step_seen:
        return dataclasses.replace(w, pace=pace)
    timed = w.steps_timed
    if w.step_seen_at is not None:   # several steps between two looks count as one gap: the silence is what matters
        pace = dataclasses.replace(pace, steps=(pace.steps + (round(now - w.step_seen_at, 3),))[-RECENT_STEPS:])
        timed += 1
    return dataclasses.replace(w, pace=pace, step_seen=hb.step, step_seen_at=now, steps_timed=timed)


def startup_limit(pace: Pace, limits: Limits) -> tuple[float, str]:
    """The start-up allowance in force, and how it was chosen."""
    if limits.startup_timeout is not None:
        return limits.startup_timeout, "fixed: [supervisor] startup_timeout_seconds"
    if not pace.boots:
        return STARTUP_DEFAULT_SECONDS, f"auto: no boot of this run seen yet (default {STARTUP_DEFAULT_SECONDS:g} s)"
    slowest = max(pace.boots)
    return (round(max(STARTUP_FLOOR_SECONDS, STARTUP_MULTIPLE * slowest), 1),
            f"auto: {STARTUP_MULTIPLE:g} x slowest recent boot {slowest:.1f} s (floor {STARTUP_FLOOR_SECONDS:g} s)")


def hang_limit(w: Watch, limits: Limits) -> tuple[float, str]:
    """The silence allowed now, in the phase of the newest beat, and how it was chosen."""
    phase = w.heartbeat.phase if w.heartbeat else Phase.BOOTING
    if not phase.booted:
        return startup_limit(w.pace, limits)
    if limits.hang_timeout is not None:
        return limits.hang_timeout, "fixed: [supervisor] hang_timeout_seconds"
    if w.steps_timed < WARMUP_STEPS:
        seconds, how = startup_limit(w.pace, limits)
        return seconds, f"{how}, for this attempt's first steps"
    p = w.pace
    terms = [(HANG_FLOOR_SECONDS, f"floor {HANG_FLOOR_SECONDS:g} s")]
    if p.steps:
        terms.append((HANG_MULTIPLE * max(p.steps), f"{HANG_MULTIPLE:g} x slowest recent step {max(p.steps):.1f} s"))
    if p.checkpoint:
        terms.append((HANG_MULTIPLE * p.checkpoint, f"{HANG_MULTIPLE:g} x slowest checkpoint write {p.checkpoint:.1f} s"))
    if phase is Phase.VALIDATING and p.validation:
        terms.append((HANG_MULTIPLE * p.validation, f"{HANG_MULTIPLE:g} x slowest validation silence "
                                                    f"{p.validation:.1f} s"))
    seconds, why = max(terms, key=lambda t: t[0])
    return round(seconds, 1), f"auto: {why}" + ("" if why.startswith("floor") else
                                               f" (floor {HANG_FLOOR_SECONDS:g} s)")


def service_seconds(value: float | str) -> float:
    """A timeout for the service manager's unit: the number, or for "auto" the start-up default (systemd is
    the last resort: it acts only when trainctl's own detection does not)."""
    return STARTUP_DEFAULT_SECONDS if isinstance(value, str) else float(value)


def in_force(w: Watch | None, limits: Limits) -> dict:
    """The timeouts in force for the attempt `w` (state.json, status --json): {"hang_timeout": {seconds, how}, ...}."""
    pace = w.pace if w is not None else Pace()
    start, start_how = startup_limit(pace, limits)
    out = {"startup_timeout": {"seconds": start, "how": start_how}}
    if w is not None:
        seconds, how = hang_limit(w, limits)
        out["hang_timeout"] = {"seconds": seconds, "how": how}
    return out


def _judge_hang(w: Watch, now: float, limits: Limits, out: list) -> Watch:
    """No new beat within the allowance of the phase (booting and the first steps: the startup one): stacks, kill."""
    phase = w.heartbeat.phase if w.heartbeat else Phase.BOOTING
    limit, how = hang_limit(w, limits)
    silent = now - w.last_progress_at
    if silent < limit:
        return w
    step = w.heartbeat.step if w.heartbeat else None
    out += [Record(Event.HANG_DETECTED, step, {"phase": phase.value, "silent_seconds": round(silent, 1),
                                               "timeout": limit, "how": how}),
            Say(f"no progress for {silent:.0f} s (phase {phase.value}): SIGABRT for the stacks, then SIGKILL "
                f"(allowed {limit:g} s, {how})"),
            Send(signal.SIGABRT), Send(signal.SIGCONT)]   # a stopped (SIGSTOP) process must run to take the SIGABRT
    return dataclasses.replace(w, kill=Kill.HANG, kill_deadline=now + ABORT_GRACE_SECONDS)


def _judge_step_up(w: Watch, now: float, limits: Limits, out: list) -> Watch:
    """Stable long enough below the top rung, progressing, memory calm: checkpoint, stop, try the rung above once."""
    hb = w.heartbeat
    if (limits.step_up_after is None or not w.may_step_up or w.rung_index == 0 or not w.ready or hb is None
            or hb.phase is not Phase.TRAINING or hb.step <= w.start_step or w.pressure_level != NORMAL
            or now - w.started_at < limits.step_up_after):
        return w
    out += [Say(f"stable on rung {w.rung_index + 1} for {now - w.started_at:.0f} s (step_up_after): checkpoint, "
                f"stop, and try rung {w.rung_index} once"), Send(signal.SIGTERM)]
    return dataclasses.replace(w, kill=Kill.STEP_UP, kill_deadline=now + limits.stop_timeout)


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
        healthy = now - w.last_progress_at < startup_limit(w.pace, limits)[0]
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
