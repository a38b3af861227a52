"""The supervisor loop against a fake worker and a fake clock: timings exact, no processes, no waiting."""
from __future__ import annotations

import signal


from trainctl.supervisor.classify import MemorySample
from trainctl.supervisor.journal import read_events
from trainctl.supervisor.runstate import read_state
from trainctl.supervisor.supervise import EXIT_GAVE_UP, EXIT_OK, Supervisor
from trainctl.supervisor.watch import ABORT_GRACE_SECONDS
from trainctl.worker import fsio
from trainctl.worker.config import load
from trainctl.worker.protocol import EXIT_DONE, EXIT_EXCEPTION, EXIT_STOPPED, HEARTBEAT_FILE

from conftest import config_text, make_run

GiB = 2**30


class World:
    """A fake clock and fake workers that follow a script, one tick per supervisor sleep."""

    def __init__(self, run_dir, scripts):
        self.run_dir, self.scripts, self.now = run_dir, list(scripts), 0.0
        self.workers, self.memory = [], 1 * GiB

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        for w in self.workers:
            w.tick(self.now)

    def launch(self, run_dir, profile_index, attempt, describe):
        w = FakeWorker(self, attempt, profile_index, self.scripts.pop(0))
        self.workers.append(w)
        w.tick(self.now)
        return w

    def sample(self, pid, reported):
        return MemorySample(at=self.now, worker=self.memory, available=20 * GiB, total=24 * GiB)


class FakeWorker:
    """script(worker, t) returns what the worker does at time t since its start: ("beat", step),
    ("silent",), ("exit", code) — and reacts to signals like the real one."""

    def __init__(self, world, attempt, profile_index, script):
        self.world, self.attempt, self.profile_index, self.script = world, attempt, profile_index, script
        self.pid, self.rc, self.signals, self.beat = 90000 + attempt, None, [], 0
        self.born = world.now
        self.killed_at = None

    def tick(self, now):
        if self.rc is not None:
            return
        if signal.SIGTERM in self.signals and self.script is not hang:
            self.rc = EXIT_STOPPED
            return
        what = self.script(self, now - self.born)
        if what[0] == "beat":
            self.beat += 1
            fsio.atomic_write_json(self.world.run_dir / HEARTBEAT_FILE, {
                "attempt": self.attempt, "beat": self.beat, "phase": what[2] if len(what) > 2 else "training",
                "step": what[1], "epoch": 0, "cursor": what[1] * 16}, durable=False)
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
        self.kill_group()
        return self.rc


def trains_then_finishes(w, t):
    return ("exit", EXIT_DONE) if t >= 5 else ("beat", int(t))


def hang(w, t):
    return ("beat", int(t)) if t < 10 else ("silent",)


def crash_at_3(w, t):
    return ("exit", EXIT_EXCEPTION) if t >= 3 else ("beat", int(t))


def never_boots(w, t):
    return ("beat", 0, "booting") if t < 1 else ("silent",)


def run_world(tmp_path, dataset, scripts, supervisor_extra="", memory=None, before=None):
    text = config_text("loop", dataset, supervisor_extra=supervisor_extra,
                       replace={"backoff_seconds = [0.1]": "backoff_seconds = [2.0, 10.0]",
                                "poll_seconds = 0.1": "poll_seconds = 0.5",
                                "hang_timeout_seconds = 60": "hang_timeout_seconds = 30"})
    run_dir = make_run(tmp_path, "loop", text)
    world = World(run_dir, scripts)
    sup = Supervisor(run_dir, load(run_dir / "config.toml"), launch=world.launch, clock=world.clock,
                     sleep=world.sleep, sample_memory=memory or world.sample, echo=lambda m: None)
    if before:
        before(sup, world)
    code = sup.run()
    return code, sup, world, read_events(run_dir)


def kinds(events, kind):
    return [e for e in events if e["kind"] == kind]


def crashes(events):
    return [e for e in kinds(events, "exit") if e["data"]["failure"] not in ("done", "stopped")]


def test_a_clean_run_succeeds_and_journals_each_transition(tmp_path, dataset):
    code, sup, world, events = run_world(tmp_path, dataset, [trains_then_finishes])
    assert code == EXIT_OK and read_state(sup.run_dir)["state"] == "succeeded"
    assert [(e["data"]["from"], e["data"]["to"]) for e in kinds(events, "state")] == [
        ("starting", "running"), ("running", "succeeded")]


def test_a_hang_is_detected_within_the_timeout_plus_one_poll(tmp_path, dataset):
    code, sup, world, events = run_world(tmp_path, dataset, [hang, trains_then_finishes])
    first = world.workers[0]
    assert first.signals[:2] == [signal.SIGABRT, signal.SIGCONT]     # stacks first, then the kill
    detected = kinds(events, "hang_detected")[0]
    silent = detected["data"]["silent_seconds"]
    assert 30 <= silent <= 30 + 0.5 + 1e-9
    assert first.killed_at - (first.born + 10) <= 30 + 0.5 + ABORT_GRACE_SECONDS + 0.5
    assert crashes(events)[0]["data"]["failure"] == "hang"
    assert code == EXIT_OK and len(world.workers) == 2


def test_booting_gets_the_startup_timeout_not_the_hang_timeout(tmp_path, dataset):
    code, sup, world, events = run_world(tmp_path, dataset, [never_boots, trains_then_finishes],
                                         supervisor_extra="startup_timeout_seconds = 100")
    detected = kinds(events, "hang_detected")[0]["data"]
    assert detected["phase"] == "booting" and 100 <= detected["silent_seconds"] <= 100.5 + 1e-9


def test_soft_memory_limit_checkpoints_stops_and_steps_down(tmp_path, dataset):
    def grow(sup, world):
        base = world.sample

        def sample(pid, reported):
            world.memory = (1 + world.now) * GiB if len(world.workers) == 1 else GiB
            return base(pid, reported)
        sup.sample_memory = sample

    code, sup, world, events = run_world(tmp_path, dataset, [lambda w, t: ("beat", int(t)), trains_then_finishes],
                                         'memory_soft_limit = "4GB"\nmemory_hard_limit = "50GB"', before=grow)
    first = world.workers[0]
    assert first.signals == [signal.SIGTERM] and first.rc == EXIT_STOPPED   # graceful: it checkpoints
    assert crashes(events)[0]["data"]["failure"] == "memory_limit"
    step_down = kinds(events, "step_down")[0]["data"]
    assert (step_down["from"], step_down["to"]) == (0, 1)
    assert world.workers[1].profile_index == 1 and code == EXIT_OK


def test_hard_memory_limit_kills_at_once(tmp_path, dataset):
    def spike(sup, world):
        base = world.sample

        def sample(pid, reported):
            world.memory = 60 * GiB if len(world.workers) == 1 and world.now >= 2 else GiB
            return base(pid, reported)
        sup.sample_memory = sample

    code, sup, world, events = run_world(tmp_path, dataset, [lambda w, t: ("beat", int(t)), trains_then_finishes],
                                         'memory_soft_limit = "40GB"\nmemory_hard_limit = "50GB"', before=spike)
    assert world.workers[0].killed_at == 2.0 and world.workers[0].signals == []
    assert crashes(events)[0]["data"]["failure"] == "memory_limit"
    assert world.workers[1].profile_index == 1


def test_a_crash_loop_on_the_last_rung_fails_in_bounded_time(tmp_path, dataset):
    code, sup, world, events = run_world(tmp_path, dataset, [crash_at_3] * 20,
                                         supervisor_extra="same_step_limit = 9")
    state = read_state(sup.run_dir)
    assert code == EXIT_GAVE_UP and state["state"] == "failed" and "ladder exhausted" in state["reason"]
    assert len(world.workers) == 2 * (3 + 1)          # (max_restarts + 1) attempts on each of 2 rungs
    assert world.now < 200                             # backoffs 2, 10, 10 ... : bounded
    assert kinds(events, "give_up")[0]["data"]["reason"] == state["reason"]


def test_the_same_step_failing_again_steps_down_then_gives_up(tmp_path, dataset):
    code, sup, world, events = run_world(tmp_path, dataset, [crash_at_3] * 20)
    assert code == EXIT_GAVE_UP and len(world.workers) == 4    # 2 at one step on each rung
    assert kinds(events, "step_down")[0]["data"]["same_step"] == 2   # its last heartbeat: step 2
    assert "failed 2 times at step 2" in read_state(sup.run_dir)["reason"]


def test_stop_during_backoff_ends_stopped_without_a_new_worker(tmp_path, dataset):
    def stop_in_backoff(sup, world):
        original = world.sleep

        def sleep(seconds):
            original(seconds)
            if sup.state.value == "backoff":
                sup.request_stop()
        world.sleep = sleep
        sup.sleep = sleep

    code, sup, world, events = run_world(tmp_path, dataset, [crash_at_3, trains_then_finishes], before=stop_in_backoff)
    assert code == EXIT_OK and read_state(sup.run_dir)["state"] == "stopped" and len(world.workers) == 1


def test_stop_asks_the_worker_then_kills_it_at_the_deadline(tmp_path, dataset):
    def stop_at_4(sup, world):
        original = world.sleep

        def sleep(seconds):
            original(seconds)
            if world.now >= 4:
                sup.request_stop()
        world.sleep = sleep
        sup.sleep = sleep

    code, sup, world, events = run_world(tmp_path, dataset, [hang], "stop_timeout_seconds = 20", before=stop_at_4)
    w = world.workers[0]
    assert w.signals[0] == signal.SIGTERM and 24 <= w.killed_at <= 24.6
    assert code == EXIT_OK and read_state(sup.run_dir)["state"] == "stopped"
    assert [e["data"]["to"] for e in kinds(events, "state")] == ["running", "stopping", "stopped"]
