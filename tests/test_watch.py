"""Table tests for `assess`, the pure core of watching a worker: every verdict, no processes, no clock."""
from __future__ import annotations

import dataclasses
import signal

import pytest

from trainctl.contract.lifecycle import Event, Kill, State
from trainctl.contract.protocol import Heartbeat, Phase
from trainctl.supervisor.classify import MemorySample
from trainctl.supervisor.watch import (ABORT_GRACE_SECONDS, HANG_FLOOR_SECONDS, RECENT_STEPS,
                                       STARTUP_DEFAULT_SECONDS, TOUCH_SECONDS, Enter, KillGroup, Limits, Pace, Ping,
                                       Ready, Record, Say, Seen, Send, StartStandby, Tell, Touch, Watch, assess,
                                       in_force, recall_pace, status_line)

GiB = 2**30
LIMITS = Limits(hang_timeout=30, startup_timeout=100, stop_timeout=20, soft_limit=4 * GiB, hard_limit=8 * GiB)
STANDBY = dataclasses.replace(LIMITS, warm_standby=True)


def hb(beat: int, phase: Phase = Phase.TRAINING, step: int = 3, attempt: int = 1, **fields) -> Heartbeat:
    return Heartbeat(pid=900, attempt=attempt, rung_index=0, beat=beat, phase=phase, step=step, epochs=3,
                     total_steps=18, **fields)


def mem(gib: float, pressure: str | None = None) -> MemorySample:
    reading = {"level": pressure, "source": "/proc/pressure/memory", "some_avg10": 12.0, "full_avg10": 1.5}
    return MemorySample(at=0.0, worker=int(gib * GiB), available=20 * GiB, total=24 * GiB,
                        pressure=reading if pressure else None)


PRESSURE = dataclasses.replace(LIMITS, ladder_size=3, pressure=True, pressure_sustained=60)
RECYCLE = dataclasses.replace(LIMITS, recycle_bytes=GiB)
STEP_UP = dataclasses.replace(LIMITS, step_up_after=3600)


BOOTING = Watch(attempt=1, rung_index=0, rung_text="cpu batch 8 x accum 2", restarts=0, start_step=0,
                last_progress_at=0.0, touched_at=0.0)
BOOTED = dataclasses.replace(BOOTING, beat=1, heartbeat=hb(1, Phase.BOOTING, step=0))
TRAINING = dataclasses.replace(BOOTING, beat=5, heartbeat=hb(5), ready=True, last_progress_at=10.0, touched_at=10.0)
WARNED = dataclasses.replace(TRAINING, pressure_level="warning", pressure_since=5.0)
LEARNED = dataclasses.replace(TRAINING, baseline=2 * GiB, heartbeat=hb(5, step=20))   # past its first steps
LOWER = dataclasses.replace(TRAINING, rung_index=1, heartbeat=hb(5, step=20))


def at(now: float, watch: Watch = TRAINING, **seen) -> tuple[Watch, Seen]:
    """A look at time `now`; unless told otherwise, state.json was just written (no Touch in the expectation)."""
    watch = dataclasses.replace(watch, touched_at=max(watch.touched_at, now - 1))
    return watch, Seen(now=now, state=State.RUNNING if watch.ready else State.STARTING, **seen)


def hang_record(step, phase: str, silent: float) -> Record:
    fixed = "fixed: [supervisor] " + ("hang_timeout_seconds" if phase == "training" else "startup_timeout_seconds")
    return Record(Event.HANG_DETECTED, step, {"phase": phase, "silent_seconds": silent, "timeout": silent, "how": fixed})


# Ready at 2 s after the spawn: the boot is timed and journaled with the pace learned so far.
READY = Record(Event.WORKER_READY, 0, {"device": None, "skipped_checkpoints": [], "boot_seconds": 2.0,
                                       "pace": Pace(boots=(2.0,)).to_json()})


SAY = "Say"   # the words are people's, checked apart; the table checks what is done
CASES = [
    # (what, (watch, seen), limits, commands in order, fields of the new watch)
    ("booting: a first beat is progress and keeps the watchdog fed",
     at(1, BOOTING, heartbeat=hb(1, Phase.BOOTING, step=0)), LIMITS, [Ping()],
     {"beat": 1, "last_progress_at": 1, "ready": False}),
    ("sanity check passed: ready, running, READY=1",
     at(2, BOOTED, heartbeat=hb(2, Phase.TRAINING, step=0)), LIMITS,
     [READY, Enter(State.RUNNING), "Ready",
      "Tell", Ping()], {"ready": True, "touched_at": 2}),
    ("ready with warm_standby: the next worker boots now",
     at(2, BOOTED, heartbeat=hb(2, Phase.TRAINING, step=0)), STANDBY,
     [READY, Enter(State.RUNNING), "Ready",
      StartStandby(), "Tell", Ping()], {"ready": True}),
    ("ready with a standby already waiting: no second one",
     at(2, BOOTED, heartbeat=hb(2, Phase.TRAINING, step=0), has_standby=True), STANDBY,
     [READY, Enter(State.RUNNING), "Ready",
      "Tell", Ping()], {"ready": True}),
    ("a new commit in the heartbeat is journaled once",
     at(11, heartbeat=hb(6, last_checkpoint={"step": 3, "path": "p", "taken": 9.5})), LIMITS,
     [Record(Event.CHECKPOINT, 3, {"path": "p", "taken": 9.5, "pace": Pace().to_json(),
                                   "hang_timeout": {"seconds": 30, "how": "fixed: [supervisor] hang_timeout_seconds"}}),
      "Tell", Ping()], {"checkpoint_step": 3}),
    ("the same commit seen again: nothing",
     at(11, dataclasses.replace(TRAINING, checkpoint_step=3), heartbeat=hb(6, last_checkpoint={"step": 3})),
     LIMITS, ["Tell", Ping()], {"checkpoint_step": 3}),
    ("a heartbeat of another attempt is not this worker's progress",
     at(20, heartbeat=hb(99, attempt=7)), LIMITS, ["Tell"], {"beat": 5, "last_progress_at": 10}),
    ("training, silent, under the hang timeout: no verdict, no ping",
     at(39.9), LIMITS, ["Tell"], {"kill": None}),
    ("training, silent for the hang timeout: stacks (SIGABRT, SIGCONT for a stopped one), then a kill deadline",
     at(40), LIMITS, [hang_record(3, "training", 30.0), SAY, Send(signal.SIGABRT), Send(signal.SIGCONT), "Tell"],
     {"kill": Kill.HANG, "kill_deadline": 40 + ABORT_GRACE_SECONDS}),
    ("booting, silent under the startup timeout: still healthy",
     at(99, BOOTED), LIMITS, [Ping()], {"kill": None}),
    ("booting, silent for the startup timeout (not the hang timeout): hung",
     at(100, BOOTED), LIMITS, [hang_record(0, "booting", 100.0), SAY, Send(signal.SIGABRT), Send(signal.SIGCONT)],
     {"kill": Kill.HANG, "kill_deadline": 100 + ABORT_GRACE_SECONDS}),
    ("no heartbeat at all is booting too",
     at(100, BOOTING), LIMITS, [hang_record(None, "booting", 100.0), SAY, Send(signal.SIGABRT),
                                Send(signal.SIGCONT)], {"kill": Kill.HANG}),
    ("below both memory limits: nothing",
     at(11, heartbeat=hb(6), memory=mem(3.9)), LIMITS, ["Tell", Ping()], {"kill": None}),
    ("past the soft memory limit: SIGTERM (it checkpoints), a stop deadline",
     at(11, heartbeat=hb(6), memory=mem(5)), LIMITS,
     [Record(Event.MEMORY_SOFT_LIMIT, None, {"worker": 5 * GiB, "limit": 4 * GiB}), SAY, Send(signal.SIGTERM), "Tell"],
     {"kill": Kill.MEMORY_SOFT, "kill_deadline": 11 + 20}),
    ("past the hard memory limit: killed at once",
     at(11, heartbeat=hb(6), memory=mem(9)), LIMITS,
     [Record(Event.MEMORY_HARD_LIMIT, None, {"worker": 9 * GiB, "limit": 8 * GiB}), SAY, KillGroup(), "Tell"],
     {"kill": Kill.MEMORY_HARD}),
    ("past the hard limit while the soft stop is under way: killed at once",
     at(12, dataclasses.replace(TRAINING, kill=Kill.MEMORY_SOFT, kill_deadline=31), memory=mem(9)), LIMITS,
     [Record(Event.MEMORY_HARD_LIMIT, None, {"worker": 9 * GiB, "limit": 8 * GiB}), SAY, KillGroup(), "Tell"],
     {"kill": Kill.MEMORY_HARD, "kill_deadline": 31}),
    ("still past the soft limit while its stop is under way: asked once",
     at(12, dataclasses.replace(TRAINING, kill=Kill.MEMORY_SOFT, kill_deadline=31), memory=mem(5)), LIMITS,
     ["Tell"], {"kill": Kill.MEMORY_SOFT}),
    ("memory is not judged again once a hang is being dealt with",
     at(41, dataclasses.replace(TRAINING, kill=Kill.HANG, kill_deadline=45), memory=mem(9)), LIMITS, ["Tell"],
     {"kill": Kill.HANG}),
    ("stop requested: STOPPING, SIGTERM (and SIGCONT: a stopped worker must run to take it), a deadline",
     at(11, stop_requested=True), LIMITS,
     [Enter(State.STOPPING, "stop requested"), SAY, Send(signal.SIGTERM), Send(signal.SIGCONT), "Tell"],
     {"stop_sent": True, "kill": Kill.STOP, "kill_deadline": 11 + 20, "touched_at": 11}),
    ("stop requested while booting",
     at(1, BOOTING, stop_requested=True), LIMITS,
     [Enter(State.STOPPING, "stop requested"), SAY, Send(signal.SIGTERM), Send(signal.SIGCONT)],
     {"kill": Kill.STOP, "kill_deadline": 21}),
    ("stop requested while a hang kill is under way: its earlier deadline stands",
     at(41, dataclasses.replace(TRAINING, kill=Kill.HANG, kill_deadline=45), stop_requested=True), LIMITS,
     [Enter(State.STOPPING, "stop requested"), SAY, Send(signal.SIGTERM), Send(signal.SIGCONT), "Tell"],
     {"kill": Kill.HANG, "kill_deadline": 45}),
    ("a stop request is carried out once",
     at(12, dataclasses.replace(TRAINING, stop_sent=True, kill=Kill.STOP, kill_deadline=31), stop_requested=True),
     LIMITS, ["Tell"], {"kill_deadline": 31}),
    ("the kill deadline passes: the process group is killed",
     at(31, dataclasses.replace(TRAINING, stop_sent=True, kill=Kill.STOP, kill_deadline=31), stop_requested=True),
     LIMITS, [SAY, KillGroup(), "Tell"], {"kill_deadline": None}),
    ("checkpoint requested: SIGUSR1, journaled",
     at(11, heartbeat=hb(6), checkpoint_requested=True), LIMITS,
     [Send(signal.SIGUSR1), Record(Event.CHECKPOINT_REQUESTED), "Tell", Ping()], {}),
    ("watchdog: a new beat since the last ping, so a ping",
     at(11, heartbeat=hb(6)), LIMITS, ["Tell", Ping()], {"fresh_beat": False, "last_progress_at": 11}),
    ("watchdog: no new beat since the last ping, so no ping",
     at(11, heartbeat=hb(5)), LIMITS, ["Tell"], {"fresh_beat": False, "last_progress_at": 10}),
    ("watchdog: never while trainctl is ending the worker, however it beats",
     at(11, dataclasses.replace(TRAINING, stop_sent=True, kill=Kill.STOP, kill_deadline=31), heartbeat=hb(6)),
     LIMITS, ["Tell"], {}),
    # the system's memory pressure (pressure.py reads it; here its level): each level acted on once
    ("pressure warning: a checkpoint now (the worker empties its device cache first)",
     at(11, heartbeat=hb(6), memory=mem(3, "warning")), PRESSURE,
     [Record(Event.MEMORY_PRESSURE, None, {**mem(3, "warning").pressure, "action": "checkpoint"}), SAY,
      Send(signal.SIGUSR1), "Tell", Ping()], {"pressure_level": "warning", "pressure_since": 11, "kill": None}),
    ("pressure warning again: asked once",
     at(12, WARNED, heartbeat=hb(6), memory=mem(3, "warning")), PRESSURE, ["Tell", Ping()],
     {"pressure_level": "warning", "pressure_since": 5.0}),
    ("pressure warning for memory_pressure_sustained_seconds: as critical, checkpoint, stop, next rung",
     at(65, WARNED, heartbeat=hb(6), memory=mem(3, "warning")), PRESSURE,
     [Record(Event.MEMORY_PRESSURE, None, {**mem(3, "warning").pressure, "action": "step_down", "why": "warning for 60 s"}),
      SAY, Send(signal.SIGTERM), "Tell"], {"kill": Kill.MEMORY_PRESSURE, "kill_deadline": 65 + 20}),
    ("pressure critical: checkpoint, stop, next rung",
     at(11, heartbeat=hb(6), memory=mem(3, "critical")), PRESSURE,
     [Record(Event.MEMORY_PRESSURE, None, {**mem(3, "critical").pressure, "action": "step_down", "why": "critical"}),
      SAY, Send(signal.SIGTERM), "Tell"], {"kill": Kill.MEMORY_PRESSURE, "pressure_level": "critical"}),
    ("pressure critical on the last rung: a checkpoint, training goes on",
     at(11, dataclasses.replace(TRAINING, rung_index=2), heartbeat=hb(6), memory=mem(3, "critical")), PRESSURE,
     [Record(Event.MEMORY_PRESSURE, None, {**mem(3, "critical").pressure, "action": "checkpoint", "why": "critical"}),
      SAY, Send(signal.SIGUSR1), "Tell", Ping()], {"kill": None, "pressure_level": "critical"}),
    ("pressure back to normal: journaled once, the clock reset",
     at(12, WARNED, heartbeat=hb(6), memory=mem(3, "normal")), PRESSURE,
     [Record(Event.MEMORY_PRESSURE, None, {**mem(3, "normal").pressure, "action": "none"}), SAY, "Tell", Ping()],
     {"pressure_level": "normal", "pressure_since": None}),
    ("pressure with memory_pressure = false: nothing",
     at(11, heartbeat=hb(6), memory=mem(3, "critical")), LIMITS, ["Tell", Ping()], {"kill": None}),
    ("pressure while booting: nothing yet (a booting worker cannot checkpoint)",
     at(1, BOOTING, heartbeat=hb(1, Phase.BOOTING, step=0), memory=mem(3, "critical")), PRESSURE, [Ping()],
     {"kill": None, "pressure_level": "normal"}),
    # a leak: the footprint of the first steps is learned, then growth past recycle_growth recycles the worker
    ("recycle: the first steps' footprint is learned (the most seen)",
     at(11, dataclasses.replace(TRAINING, baseline=2 * GiB), heartbeat=hb(6, step=4), memory=mem(2.5)), RECYCLE,
     ["Tell", Ping()], {"baseline": int(2.5 * GiB)}),
    ("recycle: grown less than allowed after the first steps: nothing",
     at(11, LEARNED, heartbeat=hb(6, step=21), memory=mem(2.9)), RECYCLE, ["Tell", Ping()],
     {"kill": None, "baseline": 2 * GiB}),
    ("recycle: grown by recycle_growth: checkpoint, stop, a fresh worker on the same rung",
     at(11, LEARNED, heartbeat=hb(6, step=21), memory=mem(3)), RECYCLE,
     [Record(Event.RECYCLE, 21, {"worker": 3 * GiB, "baseline": 2 * GiB, "growth": GiB, "allowed": GiB}), SAY,
      Send(signal.SIGTERM), "Tell"], {"kill": Kill.RECYCLE, "kill_deadline": 11 + 20}),
    ("recycle: a share of the first steps' footprint",
     at(11, LEARNED, heartbeat=hb(6, step=21), memory=mem(3)), dataclasses.replace(LIMITS, recycle_share=0.5),
     [Record(Event.RECYCLE, 21, {"worker": 3 * GiB, "baseline": 2 * GiB, "growth": GiB, "allowed": GiB}), SAY,
      Send(signal.SIGTERM), "Tell"], {"kill": Kill.RECYCLE}),
    # step_up_after: stable long enough below the top rung, try the rung above once
    ("step up: stable for step_up_after on rung 2: checkpoint, stop, try rung 1",
     at(3600, LOWER, heartbeat=hb(6, step=21)), STEP_UP, [SAY, Send(signal.SIGTERM), "Tell"],
     {"kill": Kill.STEP_UP, "kill_deadline": 3600 + 20}),
    ("step up: not yet",
     at(3599, LOWER, heartbeat=hb(6, step=21)), STEP_UP, ["Tell", Ping()], {"kill": None}),
    ("step up: never again once a rung climbed to has failed in this run",
     at(3600, dataclasses.replace(LOWER, may_step_up=False), heartbeat=hb(6, step=21)), STEP_UP, ["Tell", Ping()],
     {"kill": None}),
    ("step up: not under memory pressure",
     at(3600, dataclasses.replace(LOWER, pressure_level="warning"), heartbeat=hb(6, step=21)), STEP_UP,
     ["Tell", Ping()], {"kill": None}),
    ("step up: not from the top rung",
     at(3600, LEARNED, heartbeat=hb(6, step=21)), STEP_UP, ["Tell", Ping()], {"kill": None}),
    ("state.json is rewritten every TOUCH_SECONDS (status's 'last seen')",
     (TRAINING, Seen(now=10 + TOUCH_SECONDS, heartbeat=hb(6), state=State.RUNNING)), LIMITS,
     [Touch(), "Tell", Ping()], {"touched_at": 10 + TOUCH_SECONDS}),
]


def shape(commands: list) -> list:
    return [type(c).__name__ if isinstance(c, (Say, Tell, Ready)) else c for c in commands]


@pytest.mark.parametrize("what,look,limits,expected,fields", CASES, ids=[c[0] for c in CASES])
def test_assess(what, look, limits, expected, fields):
    watch, seen = look
    new, commands = assess(watch, seen, limits)
    assert shape(commands) == expected
    for name, value in fields.items():
        assert getattr(new, name) == value, name


def test_the_table_covers_every_command_and_kill():
    seen = {type(c) for case in CASES for c in case[3] if not isinstance(c, str)}
    seen |= {Say, Tell, Ready}
    assert seen == {Send, KillGroup, Enter, Record, Say, Ready, Tell, Ping, Touch, StartStandby}
    assert {case[4].get("kill") for case in CASES} >= set(Kill)


def test_people_read_what_is_happening():
    _, commands = assess(*at(40), LIMITS)
    assert "no progress for 30 s (phase training)" in next(c.message for c in commands if isinstance(c, Say))
    _, commands = assess(*at(11, memory=mem(5)), LIMITS)
    assert "5.00 GiB is past the soft limit" in next(c.message for c in commands if isinstance(c, Say))


def test_the_service_status_line_names_progress_rung_and_restarts():
    line = status_line(dataclasses.replace(TRAINING, heartbeat=hb(5, loss=0.5), restarts=2), State.RUNNING)
    assert line == "running: epoch 1/3 step 3/18 loss 0.5000 | rung 1 (cpu batch 8 x accum 2) | restarts 2"


def test_assess_is_pure():
    """Same look, same answer; the watch it was given is untouched."""
    watch, seen = at(40)
    first, second = assess(watch, seen, LIMITS), assess(watch, seen, LIMITS)
    assert first == second and watch.kill is None


# ---- hang timeouts that calibrate themselves ("auto") ---------------------------------------------
AUTO = Limits(hang_timeout=None, startup_timeout=None, stop_timeout=20)
FAST = Pace(steps=(0.5,) * 6, boots=(8.0,))


def warm(pace: Pace, watch: Watch = TRAINING, timed: int = 6) -> Watch:
    """A training attempt past its first steps, with the run's pace so far."""
    return dataclasses.replace(watch, pace=pace, steps_timed=timed)


def validating(pace: Pace) -> Watch:
    return dataclasses.replace(warm(pace), heartbeat=hb(5, Phase.VALIDATING))


def allowed(watch: Watch, limits: Limits = AUTO) -> tuple[float, str]:
    return in_force(watch, limits)["hang_timeout"]["seconds"], in_force(watch, limits)["hang_timeout"]["how"]


AUTO_CASES = [
    # (what, watch, limits, seconds allowed, how it reads)
    ("fast steps (0.5 s): the floor", warm(FAST), AUTO, HANG_FLOOR_SECONDS, "auto: floor 30 s"),
    ("90 s steps on the CPU rung: 5 x the slowest recent step", warm(Pace(steps=(80.0, 90.0, 85.0))), AUTO, 450.0,
     "auto: 5 x slowest recent step 90.0 s (floor 30 s)"),
    ("only the recent steps count", warm(Pace.from_json({"steps": [500.0] + [1.0] * RECENT_STEPS})), AUTO, 30.0,
     "auto: floor 30 s"),
    ("a slow checkpoint write has its own allowance", warm(Pace(steps=(0.5,), checkpoint=20.0)), AUTO, 100.0,
     "auto: 5 x slowest checkpoint write 20.0 s (floor 30 s)"),
    ("validation has its own allowance", validating(Pace(steps=(0.5,), validation=12.0)), AUTO, 60.0,
     "auto: 5 x slowest validation silence 12.0 s (floor 30 s)"),
    ("validation's allowance is not training's", warm(Pace(steps=(0.5,), validation=12.0)), AUTO, 30.0,
     "auto: floor 30 s"),
    ("a fixed number in the config wins", warm(Pace(steps=(90.0,))), LIMITS, 30, "fixed: [supervisor] hang_timeout_seconds"),
    ("an attempt's first steps get the start-up allowance (learned from boots)", warm(FAST, timed=1), AUTO, 120.0,
     "auto: 5 x slowest recent boot 8.0 s (floor 120 s), for this attempt's first steps"),
    ("booting: 5 x the slowest previous boot", dataclasses.replace(BOOTED, pace=Pace(boots=(30.0, 40.0))), AUTO,
     200.0, "auto: 5 x slowest recent boot 40.0 s (floor 120 s)"),
    ("booting, no boot of this run seen yet: 900 s", BOOTED, AUTO, STARTUP_DEFAULT_SECONDS,
     "auto: no boot of this run seen yet (default 900 s)"),
    ("booting with a fixed startup timeout", dataclasses.replace(BOOTED, pace=Pace(boots=(30.0,))), LIMITS, 100,
     "fixed: [supervisor] startup_timeout_seconds"),
]


@pytest.mark.parametrize("what,watch,limits,seconds,how", AUTO_CASES, ids=[c[0] for c in AUTO_CASES])
def test_the_timeout_in_force(what, watch, limits, seconds, how):
    assert allowed(watch, limits) == (seconds, how)


@pytest.mark.parametrize("what,watch,limits,seconds,how", AUTO_CASES, ids=[c[0] for c in AUTO_CASES])
def test_hung_exactly_at_the_timeout_in_force(what, watch, limits, seconds, how):
    before, _ = assess(*at(watch.last_progress_at + seconds - 0.1, watch), limits)
    after, commands = assess(*at(watch.last_progress_at + seconds, watch), limits)
    assert before.kill is None and after.kill is Kill.HANG
    record = next(c for c in commands if isinstance(c, Record))
    assert record.data["timeout"] == seconds and record.data["how"] == how


def test_a_90s_step_is_not_hung_where_the_old_fixed_300s_would_have_killed_it():
    slow = warm(Pace(steps=(90.0,) * 5))
    new, commands = assess(*at(slow.last_progress_at + 400, slow), AUTO)
    assert new.kill is None and not any(isinstance(c, Send) for c in commands)


def test_step_gaps_are_timed_by_the_supervisors_own_clock():
    w = dataclasses.replace(TRAINING, step_seen=3, step_seen_at=10.0)
    w, _ = assess(*at(12.5, w, heartbeat=hb(6, step=4)), AUTO)
    w, _ = assess(*at(13.0, w, heartbeat=hb(7, step=4)), AUTO)          # a beat, the same step: no gap
    w, _ = assess(*at(14.0, w, heartbeat=hb(8, step=6)), AUTO)          # two steps between looks: one gap
    assert w.pace.steps == (2.5, 1.5) and w.steps_timed == 2


def test_validation_is_timed_apart_and_not_as_a_step():
    w = dataclasses.replace(TRAINING, step_seen=3, step_seen_at=10.0)
    w, _ = assess(*at(11, w, heartbeat=hb(6, Phase.VALIDATING, step=3)), AUTO)
    w, _ = assess(*at(15, w, heartbeat=hb(7, Phase.VALIDATING, step=3)), AUTO)   # 4 s of silence in validation
    w, _ = assess(*at(16, w, heartbeat=hb(8, step=3)), AUTO)
    w, _ = assess(*at(17, w, heartbeat=hb(9, step=4)), AUTO)
    assert w.pace.validation == 4.0 and w.pace.steps == (1.0,)


def test_checkpoint_writes_and_boots_are_learned():
    w = dataclasses.replace(BOOTED, started_at=0.0)
    w, commands = assess(*at(7.5, w, heartbeat=hb(2, step=0, checkpoint_write_seconds=3.25)), AUTO)
    assert w.pace.boots == (7.5,) and w.pace.checkpoint == 3.25
    ready = next(c for c in commands if isinstance(c, Record) and c.event is Event.WORKER_READY)
    assert ready.data["boot_seconds"] == 7.5 and ready.data["pace"] == w.pace.to_json()


def test_what_was_learned_survives_a_supervisor_restart():
    """The journal's newest pace is what a restarted supervisor starts from; an older journal gives none."""
    journaled = [{"kind": "worker_ready", "data": {"pace": FAST.to_json()}},
                 {"kind": "checkpoint", "data": {"pace": Pace(steps=(2.0,), boots=(8.0,)).to_json()}},
                 {"kind": "exit", "data": {"failure": "hang"}}]
    assert recall_pace(journaled) == Pace(steps=(2.0,), boots=(8.0,))
    assert recall_pace([{"kind": "spawn", "data": {}}]) == Pace()
    assert Pace.from_json({"steps": "garbage"}) == Pace()

