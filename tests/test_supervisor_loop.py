"""The supervisor loop against fake workers, a fake clock and a fake host: timings exact, no process at all.

Everything the loop does outside the run folder goes through its `Host`; here every part of it is a
fake, and a spy on `subprocess.Popen` fails the test if the loop starts a process anyway. The run
folder, the journal (SQLite) and state.json are real files.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
from types import SimpleNamespace

import pytest
from conftest import config_text, make_run

from trainctl.contract import fsio
from trainctl.contract.config import load
from trainctl.contract.lifecycle import Event
from trainctl.contract.protocol import ExitCode
from trainctl.contract.runfolder import HEARTBEAT_FILE, JOURNAL_FILE, STATE_FILE
from trainctl.supervisor.classify import MemorySample
from trainctl.supervisor.host import Host
from trainctl.supervisor.journal import RETRY_SECONDS, read_events
from trainctl.supervisor import rung_memory
from trainctl.supervisor.notify import Notifier
from trainctl.supervisor.pressure import Level, Reading
from trainctl.supervisor.runstate import read_state
from trainctl.supervisor.supervise import Supervisor
from trainctl.supervisor.watch import ABORT_GRACE_SECONDS

GiB = 2**30


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    """Any process the loop would start fails the test (and is recorded, to be asserted on)."""
    started = []

    def refuse(*args, **kwargs):
        started.append(args[0] if args else kwargs.get("args"))
        raise AssertionError(f"the loop started a process: {started[-1]}")
    monkeypatch.setattr(subprocess, "Popen", refuse)
    yield started
    assert started == []


class World:
    """A fake clock and fake workers that follow a script, one tick per supervisor sleep."""

    def __init__(self, run_dir, scripts):
        self.run_dir, self.scripts, self.now = run_dir, list(scripts), 0.0
        self.workers, self.memory, self.messages = [], 1 * GiB, []
        self.standbys, self.inhibitors = [], []
        self.on_tick = []          # callables run after every tick: what a test does to the world meanwhile
        self.pressure = None       # the system's memory-pressure level the fake reader reports (None: no signal)

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        for w in self.workers:
            w.tick(self.now)
        for callback in self.on_tick:
            callback()

    def launch(self, run_dir, rung_index, attempt, describe):
        w = FakeWorker(self, attempt, rung_index, self.scripts.pop(0))
        self.workers.append(w)
        w.tick(self.now)
        return w

    def launch_standby(self, run_dir):
        standby = FakeWorker(self, None, None, self.scripts.pop(0))
        self.standbys.append(standby)
        return standby

    def sample(self, pid, reported):
        return MemorySample(at=self.now, worker=self.memory, available=20 * GiB, total=24 * GiB)

    def read_pressure(self):
        return None if self.pressure is None else Reading(Level(self.pressure), "fake /proc/pressure/memory", 50.0,
                                                          30.0 if self.pressure == "critical" else 1.0)

    def keep_awake(self, run_name, pid, echo):
        inhibitor = FakeInhibitor()
        self.inhibitors.append(inhibitor)
        return inhibitor

    def host(self) -> Host:
        return Host(spawn=self.launch, spawn_standby=self.launch_standby, find_orphans=lambda run_dir: [],
                    settle_orphans=lambda found, grace: [], keep_awake=self.keep_awake, sample_memory=self.sample,
                    total_memory=lambda: 24 * GiB, clock=self.clock, sleep=self.sleep, notifier=Notifier(""),
                    pressure_reader=lambda thresholds: SimpleNamespace(read=self.read_pressure))


class FakeInhibitor:
    def __init__(self):
        self.started = self.stopped = False

    def start(self):
        self.started = True

    def check(self):
        pass

    def stop(self):
        self.stopped = True


class FakeWorker:
    """script(worker, t) returns what the worker does at time t since its start: ("beat", step),
    ("silent",), ("exit", code) — and reacts to signals like the real one."""

    def __init__(self, world, attempt, rung_index, script):
        self.world, self.attempt, self.rung_index, self.script = world, attempt, rung_index, script
        self.pid, self.rc, self.signals, self.beat = 90000 + len(world.workers) + len(world.standbys), None, [], 0
        self.born = world.now
        self.killed_at = None

    def tick(self, now):
        if self.rc is not None or self.attempt is None:
            return
        if signal.SIGTERM in self.signals and self.script is not hang:
            self.rc = ExitCode.STOPPED
            return
        what = self.script(self, now - self.born)
        if what[0] == "beat":
            self.beat += 1
            fsio.atomic_write_json(self.world.run_dir / HEARTBEAT_FILE, {
                "pid": self.pid, "attempt": self.attempt, "rung_index": self.rung_index, "beat": self.beat,
                "phase": what[2] if len(what) > 2 else "training", "step": what[1], "epoch": 0,
                "cursor": what[1] * 16}, durable=False)
        elif what[0] == "exit":
            self.rc = what[1]

    def poll(self):
        return self.rc

    def signal(self, sig):
        self.signals.append(sig)

    def wait(self, timeout):
        self.world.sleep(timeout)
        return self.rc

    def kill_group(self):
        if self.rc is None:
            self.rc, self.killed_at = -signal.SIGKILL, self.world.now

    def stop(self, timeout):
        self.signals.append(signal.SIGTERM)
        self.tick(self.world.now)
        self.kill_group()
        return self.rc

    def go(self, rung_index, attempt, describe):   # a standby taking over
        self.attempt, self.rung_index, self.born = attempt, rung_index, self.world.now
        self.world.workers.append(self)
        return True

    def release(self):
        self.rc = 0


def trains_then_finishes(w, t):
    return ("exit", ExitCode.OK) if t >= 5 else ("beat", int(t))


def hang(w, t):
    return ("beat", int(t)) if t < 10 else ("silent",)


def crash_at_3(w, t):
    return ("exit", ExitCode.INTERNAL_ERROR) if t >= 3 else ("beat", int(t))


def never_boots(w, t):
    return ("beat", 0, "booting") if t < 1 else ("silent",)


def trains(w, t):
    return ("beat", int(t))


def loop_run(tmp_path, dataset, **sections) -> tuple:
    supervisor = {"backoff_seconds": [2.0, 10.0], "poll_seconds": 0.5, "hang_timeout_seconds": 30,
                  **sections.pop("supervisor", {})}
    run_dir = make_run(tmp_path, "loop", config_text("loop", dataset, supervisor=supervisor, **sections))
    return run_dir, load(run_dir / "config.toml")


def run_world(tmp_path, dataset, scripts, before=None, **sections):
    run_dir, cfg = loop_run(tmp_path, dataset, **sections)
    world = World(run_dir, scripts)
    sup = Supervisor(run_dir, cfg, world.host(), echo=world.messages.append)
    if before:
        before(sup, world)
    code = sup.run()
    return code, sup, world, read_events(run_dir)


def kinds(events, kind):
    return [e for e in events if e["kind"] == kind]


def crashes(events):
    return [e for e in kinds(events, Event.EXIT) if e["data"]["failure"] not in ("done", "stopped")]


def test_a_clean_run_succeeds_and_journals_each_transition(tmp_path, dataset):
    code, sup, world, events = run_world(tmp_path, dataset, [trains_then_finishes])
    assert code == ExitCode.OK and read_state(sup.run_dir).state == "succeeded"
    assert [(e["data"]["from"], e["data"]["to"]) for e in kinds(events, Event.STATE)] == [
        ("starting", "running"), ("running", "succeeded")]
    inhibitor, = world.inhibitors
    assert inhibitor.started and inhibitor.stopped            # the machine was kept awake, then let go


def test_a_hang_is_detected_within_the_timeout_plus_one_poll(tmp_path, dataset):
    code, sup, world, events = run_world(tmp_path, dataset, [hang, trains_then_finishes])
    first = world.workers[0]
    assert first.signals[:2] == [signal.SIGABRT, signal.SIGCONT]     # stacks first, then the kill
    detected = kinds(events, Event.HANG_DETECTED)[0]
    silent = detected["data"]["silent_seconds"]
    assert 30 <= silent <= 30 + 0.5 + 1e-9
    assert first.killed_at - (first.born + 10) <= 30 + 0.5 + ABORT_GRACE_SECONDS + 0.5
    assert crashes(events)[0]["data"]["failure"] == "hang"
    assert code == ExitCode.OK and len(world.workers) == 2


def test_booting_gets_the_startup_timeout_not_the_hang_timeout(tmp_path, dataset):
    code, sup, world, events = run_world(tmp_path, dataset, [never_boots, trains_then_finishes],
                                         supervisor={"startup_timeout_seconds": 100})
    detected = kinds(events, Event.HANG_DETECTED)[0]["data"]
    assert detected["phase"] == "booting" and 100 <= detected["silent_seconds"] <= 100.5 + 1e-9


def test_soft_memory_limit_checkpoints_stops_and_steps_down(tmp_path, dataset):
    def grow(sup, world):
        world.sample = lambda pid, reported: MemorySample(world.now, (1 + world.now) * GiB if len(world.workers) == 1
                                                          else GiB, 20 * GiB, 24 * GiB)
        sup.host.sample_memory = world.sample

    code, sup, world, events = run_world(tmp_path, dataset, [trains, trains_then_finishes], before=grow,
                                         supervisor={"memory_soft_limit": "4GB", "memory_hard_limit": "50GB"})
    first = world.workers[0]
    assert first.signals == [signal.SIGTERM] and first.rc == ExitCode.STOPPED   # graceful: it checkpoints
    assert crashes(events)[0]["data"]["failure"] == "memory_limit"
    step_down = kinds(events, Event.STEP_DOWN)[0]["data"]
    assert (step_down["from"], step_down["to"]) == (0, 1)
    assert world.workers[1].rung_index == 1 and code == ExitCode.OK


def test_hard_memory_limit_kills_at_once(tmp_path, dataset):
    def spike(sup, world):
        sup.host.sample_memory = lambda pid, reported: MemorySample(
            world.now, 60 * GiB if len(world.workers) == 1 and world.now >= 2 else GiB, 20 * GiB, 24 * GiB)

    code, sup, world, events = run_world(tmp_path, dataset, [trains, trains_then_finishes], before=spike,
                                         supervisor={"memory_soft_limit": "40GB", "memory_hard_limit": "50GB"})
    assert world.workers[0].killed_at == 2.0 and world.workers[0].signals == []
    assert crashes(events)[0]["data"]["failure"] == "memory_limit"
    assert world.workers[1].rung_index == 1


def test_critical_memory_pressure_checkpoints_stops_and_steps_down_and_status_shows_it(tmp_path, dataset):
    def pressure(sup, world):
        world.on_tick.append(lambda: setattr(world, "pressure", "critical" if len(world.workers) == 1 and
                                             world.now >= 3 else "normal"))

    code, sup, world, events = run_world(tmp_path, dataset, [trains, trains_then_finishes], before=pressure)
    first = world.workers[0]
    assert first.signals == [signal.SIGTERM] and first.rc == ExitCode.STOPPED   # graceful: it checkpoints
    said = kinds(events, Event.MEMORY_PRESSURE)[0]["data"]
    assert (said["level"], said["action"], said["source"]) == ("critical", "step_down", "fake /proc/pressure/memory")
    ended = kinds(events, Event.EXIT)[0]["data"]
    assert ended["failure"] == "memory_limit" and "under memory pressure (critical" in ended["detail"]
    assert kinds(events, Event.STEP_DOWN)[0]["data"]["to"] == 1 and world.workers[1].rung_index == 1
    assert code == ExitCode.OK and read_state(sup.run_dir).memory["pressure"]["level"] == "normal"


def test_a_warning_asks_for_a_checkpoint_once_and_training_goes_on(tmp_path, dataset):
    def pressure(sup, world):
        world.on_tick.append(lambda: setattr(world, "pressure", "warning" if 2 <= world.now < 4 else "normal"))

    code, sup, world, events = run_world(tmp_path, dataset, [trains_then_finishes], before=pressure)
    assert world.workers[0].signals == [signal.SIGUSR1] and code == ExitCode.OK
    assert [e["data"]["action"] for e in kinds(events, Event.MEMORY_PRESSURE)] == ["checkpoint", "none"]


def test_a_leaking_worker_is_recycled_on_the_same_rung_without_using_the_budget(tmp_path, dataset):
    def leak(sup, world):   # the first worker holds 1 GiB over its first steps, then grows 0.25 GiB a second
        sup.host.sample_memory = lambda pid, reported: MemorySample(
            world.now, int((1 + max(0.0, world.now - 12) / 4) * GiB) if len(world.workers) == 1 else GiB,
            20 * GiB, 24 * GiB)

    code, sup, world, events = run_world(tmp_path, dataset, [trains, trains_then_finishes], before=leak,
                                         supervisor={"recycle_growth": "1GB", "max_restarts_per_profile": 0})
    first, second = world.workers
    assert first.signals == [signal.SIGTERM] and first.rc == ExitCode.STOPPED
    recycled = kinds(events, Event.RECYCLE)[0]
    assert recycled["data"]["baseline"] == GiB and recycled["data"]["growth"] >= GiB
    assert kinds(events, Event.EXIT)[0]["data"]["failure"] == "recycled"
    assert second.rung_index == 0
    assert kinds(events, Event.RESTART) == [] and kinds(events, Event.STEP_DOWN) == []   # no budget, no backoff
    assert code == ExitCode.OK and read_state(sup.run_dir).restarts == 0


def test_a_lower_rung_stable_long_enough_climbs_once_and_stays_down_when_that_fails(tmp_path, dataset):
    def trains_a_minute(w, t):
        return ("exit", ExitCode.OK) if t >= 60 else ("beat", int(t))

    code, sup, world, events = run_world(
        tmp_path, dataset, [trains, crash_at_3, trains_a_minute],
        before=lambda sup, world: setattr(sup, "rung_index", 1), supervisor={"step_up_after": 20})
    assert [w.rung_index for w in world.workers] == [1, 0, 1] and code == ExitCode.OK
    assert [e["data"]["failure"] for e in kinds(events, Event.EXIT)] == ["stepped_up", "exception", "done"]
    up, = kinds(events, Event.STEP_UP)
    assert (up["data"]["from"], up["data"]["to"]) == (1, 0)
    down, = kinds(events, Event.STEP_DOWN)
    assert down["data"]["after_step_up"] and "staying on rung 2" in down["data"]["reason"]
    assert world.workers[2].signals == []   # stable long enough again, but no second climb in this run


def test_a_new_run_starts_below_a_rung_that_ran_out_of_memory_three_times_on_this_machine(tmp_path, dataset):
    run_dir, cfg = loop_run(tmp_path, dataset)
    for _ in range(3):   # three earlier runs' OOMs on rung 1 (this test's own $XDG_STATE_HOME: conftest)
        assert rung_memory.note_memory_failure(rung_memory.key_of(cfg, 0), "oom", "earlier")
    world = World(run_dir, [trains_then_finishes])
    assert Supervisor(run_dir, cfg, world.host(), echo=world.messages.append).run() == ExitCode.OK
    assert [w.rung_index for w in world.workers] == [1]
    started, = kinds(read_events(run_dir), Event.START_RUNG)
    assert started["data"]["reason"].startswith("starting on rung 2 (cpu batch 4 x accum 4): rung 1 (cpu batch 8 x "
                                                "accum 2) ran out of memory 3 times on this machine since ")
    assert started["data"]["reason"] in world.messages
    assert rung_memory.load()[rung_memory.key_of(cfg, 1).text()].stable is not None   # it finished there: stable


def test_a_memory_failure_is_remembered_for_the_next_run_and_learn_rungs_false_ignores_it(tmp_path, dataset):
    def oom_at_2(w, t):
        return ("exit", ExitCode.OUT_OF_MEMORY) if t >= 2 else ("beat", int(t))

    cfg = run_world(tmp_path, dataset, [oom_at_2, trains_then_finishes])[1].cfg
    entry = rung_memory.load()[rung_memory.key_of(cfg, 0).text()]
    assert len(entry.memory_failures) == 1 and entry.last_failure_kind == "oom"
    for _ in range(2):
        rung_memory.note_memory_failure(rung_memory.key_of(cfg, 0), "oom", "earlier")
    (tmp_path / "off").mkdir()
    code, sup, world, events = run_world(tmp_path / "off", dataset, [trains_then_finishes],
                                         supervisor={"learn_rungs": False})
    assert [w.rung_index for w in world.workers] == [0] and kinds(events, Event.START_RUNG) == []


def test_a_crash_loop_on_the_last_rung_fails_in_bounded_time(tmp_path, dataset):
    code, sup, world, events = run_world(tmp_path, dataset, [crash_at_3] * 20, supervisor={"same_step_limit": 9})
    state = read_state(sup.run_dir)
    assert code == ExitCode.FAILED and state.state == "failed" and "ladder exhausted" in state.reason
    assert len(world.workers) == 2 * (3 + 1)          # (max_restarts + 1) attempts on each of 2 rungs
    assert world.now < 200                             # backoffs 2, 10, 10 ... : bounded (fake time)
    assert kinds(events, Event.GIVE_UP)[0]["data"]["reason"] == state.reason


def test_the_same_step_failing_again_steps_down_then_gives_up_naming_its_images(tmp_path, dataset):
    code, sup, world, events = run_world(tmp_path, dataset, [crash_at_3] * 20)
    assert code == ExitCode.FAILED and len(world.workers) == 4    # 2 at one step on each rung
    assert kinds(events, Event.STEP_DOWN)[0]["data"]["same_step"] == 2   # its last heartbeat: step 2
    reason = read_state(sup.run_dir).state, read_state(sup.run_dir).reason
    assert reason[0] == "failed" and "failed 2 times at step 2" in reason[1]
    assert str(dataset[0]) in reason[1] and (".jpg" in reason[1] or ".png" in reason[1])   # found in process


def test_stop_during_backoff_ends_stopped_without_a_new_worker(tmp_path, dataset):
    def stop_in_backoff(sup, world):
        world.on_tick.append(lambda: sup.state.value == "backoff" and sup.request_stop())

    code, sup, world, events = run_world(tmp_path, dataset, [crash_at_3, trains_then_finishes], before=stop_in_backoff)
    assert code == ExitCode.OK and read_state(sup.run_dir).state == "stopped" and len(world.workers) == 1


def test_stop_asks_the_worker_then_kills_it_at_the_deadline(tmp_path, dataset):
    def stop_at_4(sup, world):
        world.on_tick.append(lambda: world.now >= 4 and sup.request_stop())

    code, sup, world, events = run_world(tmp_path, dataset, [hang], before=stop_at_4,
                                         supervisor={"stop_timeout_seconds": 20})
    w = world.workers[0]
    assert w.signals[:2] == [signal.SIGTERM, signal.SIGCONT] and 24 <= w.killed_at <= 24.6
    assert code == ExitCode.OK and read_state(sup.run_dir).state == "stopped"
    assert crashes(events) == []     # the kill that ended our own stop is the stop's end, not a crash (issue 17, 8)
    assert "killed at the end of the stop timeout" in kinds(events, Event.EXIT)[0]["data"]["detail"]
    assert [e["data"]["to"] for e in kinds(events, Event.STATE)] == ["running", "stopping", "stopped"]


def test_a_warm_standby_is_booted_when_training_starts_and_takes_over_after_a_crash(tmp_path, dataset):
    code, sup, world, events = run_world(tmp_path, dataset, [crash_at_3, trains_then_finishes, trains],
                                         supervisor={"warm_standby": True})
    first_standby = world.standbys[0]
    assert world.workers[1] is first_standby and first_standby.attempt == 2     # it took over attempt 2
    assert len(world.standbys) == 2 and world.standbys[1].rc == 0               # the next one, let go at the end
    assert code == ExitCode.OK


# ---- the supervisor's own troubles: they must not cost the run ----------------------------------------------
def test_a_locked_journal_costs_the_run_nothing_and_its_events_are_written_late(tmp_path, dataset):
    """Another program holds the journal's write lock for a while: events wait in memory, training goes on."""
    holder = {}

    def lock_journal(sup, world):
        def tick():
            if world.now >= 1 and "db" not in holder:
                holder["db"] = sqlite3.connect(sup.run_dir / JOURNAL_FILE, isolation_level=None)
                holder["db"].execute("BEGIN EXCLUSIVE")          # a real lock: the supervisor's writes fail
            elif world.now >= 4 + 2 * RETRY_SECONDS and holder.get("db"):
                holder.pop("db").rollback()
                holder["db"] = None
            if world.now in (2.0, 8.0):
                sup.request_checkpoint()                         # events to journal while it is locked
        world.on_tick.append(tick)

    code, sup, world, events = run_world(tmp_path, dataset, [lambda w, t: ("exit", 0) if t >= 20 else ("beat", int(t))],
                                         before=lock_journal)
    assert holder == {"db": None}                                       # it was locked, then released
    assert code == ExitCode.OK and read_state(sup.run_dir).state == "succeeded"
    assert [e["kind"] for e in events] == ["supervisor_start", "spawn", "worker_ready", "state", "checkpoint_requested",
                                           "checkpoint_requested", "exit", "finish", "state"]
    assert world.workers[0].signals == [signal.SIGUSR1, signal.SIGUSR1]   # the requests reached the worker
    said = "\n".join(world.messages)
    assert "cannot write the journal" in said and "database is locked" in said and "written late" in said


def test_an_unwritable_state_file_costs_the_run_nothing(tmp_path, dataset):
    """state.json's temporary file cannot be created for a while (a real failed write, EISDIR)."""
    blocker = {}

    def block_state(sup, world):
        def tick():
            if world.now >= 1 and not blocker:
                blocker["dir"] = fsio.temp_name_for(sup.run_dir / STATE_FILE)
                blocker["dir"].mkdir()
            elif world.now >= 12 and blocker.get("dir"):
                blocker.pop("dir").rmdir()
                blocker["dir"] = None
        world.on_tick.append(tick)

    code, sup, world, events = run_world(tmp_path, dataset, [lambda w, t: ("exit", 0) if t >= 20 else ("beat", int(t))],
                                         before=block_state)
    assert blocker == {"dir": None}
    assert code == ExitCode.OK and read_state(sup.run_dir).state == "succeeded"
    said = "\n".join(world.messages)
    assert "cannot write state.json" in said and "state.json is writable again" in said


def test_a_supervisor_error_stops_the_worker_at_a_checkpoint_and_exits_to_be_restarted(tmp_path, dataset):
    def break_at_3(sup, world):
        sample = sup.host.sample_memory

        def broken(pid, reported):
            if world.now >= 3:
                raise RuntimeError("a bug in the supervisor")
            return sample(pid, reported)
        sup.host.sample_memory = broken

    code, sup, world, events = run_world(tmp_path, dataset, [trains], before=break_at_3)
    worker, = world.workers
    assert code == ExitCode.INTERNAL_ERROR == 70
    assert worker.signals == [signal.SIGTERM] and worker.rc == ExitCode.STOPPED     # graceful: it checkpointed
    state = read_state(sup.run_dir)
    assert state.state == "stopped" and state.reason.startswith("supervisor error (RuntimeError: a bug in the super")
    assert [e["data"]["failure"] for e in kinds(events, Event.EXIT)] == ["stopped"]   # its end is journaled
    error, = kinds(events, Event.SUPERVISOR_ERROR)
    assert "Traceback" in error["data"]["traceback"] and "a bug in the supervisor" in error["data"]["error"]
    assert world.inhibitors[0].stopped


def test_the_crash_loop_budget_survives_the_supervisor(tmp_path, dataset):
    """Two failures, the supervisor dies in the backoff, a new one takes over: it gives up after exactly the
    configured budget (4 attempts on the one rung), not after a fresh one."""
    run_dir, cfg = loop_run(tmp_path, dataset, supervisor={"same_step_limit": 9},
                            profiles=[{"device": "cpu", "batch_size": 8}])

    class Died(BaseException):
        """Stands for a SIGKILL: nothing after it runs in the loop."""

    first = World(run_dir, [crash_at_3] * 2)
    sup = Supervisor(run_dir, cfg, first.host(), echo=first.messages.append)

    def die_in_the_second_backoff():
        if len(first.workers) == 2 and sup.state.value == "backoff":
            raise Died()
    first.on_tick.append(die_in_the_second_backoff)
    with pytest.raises(Died):
        sup.run()
    second = World(run_dir, [crash_at_3] * 10)
    code = Supervisor(run_dir, cfg, second.host(), echo=second.messages.append).run()
    assert code == ExitCode.FAILED and len(first.workers) + len(second.workers) == 3 + 1
    assert "4 failures on rung 1 without progress" in read_state(run_dir).reason
    assert [e["attempt"] for e in kinds(read_events(run_dir), Event.SPAWN)] == [1, 2, 3, 4]


def test_a_person_resuming_gets_a_fresh_budget_and_is_told(tmp_path, dataset):
    run_dir, cfg = loop_run(tmp_path, dataset, supervisor={"same_step_limit": 9},
                            profiles=[{"device": "cpu", "batch_size": 8}])
    first = World(run_dir, [crash_at_3] * 4)
    assert Supervisor(run_dir, cfg, first.host(), echo=first.messages.append).run() == ExitCode.FAILED
    again = World(run_dir, [crash_at_3] * 10)
    assert Supervisor(run_dir, cfg, again.host(), fresh_budget=True, echo=again.messages.append).run() == ExitCode.FAILED
    assert len(again.workers) == 4                               # a whole budget again
    reset, = kinds(read_events(run_dir), Event.BUDGET_RESET)
    assert reset["data"] == {"attempts": 4, "failed": 4}
    assert any("fresh restart budget (4 earlier failed attempt(s)" in m for m in again.messages)


def test_rung_and_attempt_numbers_continue_across_supervisors(tmp_path, dataset):
    """After a step-down and a supervisor restart, the new supervisor trains on the lower rung, attempt 3."""
    run_dir, cfg = loop_run(tmp_path, dataset, supervisor={"memory_soft_limit": "", "memory_hard_limit": "50GB"})
    first = World(run_dir, [trains])
    sup = Supervisor(run_dir, cfg, first.host(), echo=first.messages.append)
    sup.host.sample_memory = lambda pid, reported: MemorySample(first.now, 60 * GiB if first.now >= 2 else GiB,
                                                                20 * GiB, 24 * GiB)
    first.on_tick.append(lambda: sup.state.value == "backoff" and sup.request_stop())
    assert sup.run() == ExitCode.OK
    second = World(run_dir, [trains_then_finishes])
    assert Supervisor(run_dir, cfg, second.host(), echo=second.messages.append).run() == ExitCode.OK
    worker, = second.workers
    assert (worker.attempt, worker.rung_index) == (2, 1)
    assert dataclasses.asdict(read_state(run_dir))["restarts"] == 1


def test_the_loop_is_not_fooled_by_a_popen_it_never_calls(no_processes):
    """The spy itself works: a process started here is refused and recorded (then cleared for the fixture)."""
    with pytest.raises(AssertionError, match="started a process"):
        subprocess.run(["true"])
    assert no_processes == [["true"]]
    no_processes.clear()
    assert os.getpid() > 0
