"""`trainctl status` from real run folders: it tells what holds now, not an earlier end's report, a dead
worker's memory, a booting worker's step 0 or an empty evidence file."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import config_text, events, make_run, run_worker, wait_for
from rich.console import Console

from trainctl.contract.lifecycle import Event, State
from trainctl.contract.protocol import ExitCode, Phase, read_heartbeat
from trainctl.contract.records import RunState
from trainctl.contract.runfolder import error_json_path, newest_checkpoint
from trainctl.supervisor import report, runstate
from trainctl.supervisor.classify import MemorySample
from trainctl.supervisor.journal import Journal
from trainctl.supervisor.status import gather
from trainctl.supervisor.view import render_status
from trainctl.worker.report import Reporter


MEMORY_ROW = "system available"    # the view's memory row: "worker 1.02 GiB, system available ..."


def render(st) -> str:
    console = Console(file=io.StringIO(), width=250)
    console.print(render_status(st))
    return console.file.getvalue()


@contextlib.contextmanager
def supervised(run_dir: Path, state: State, **facts):
    """This process as the run's supervisor: it holds the run's lock and writes state.json, as a supervisor does."""
    lock = runstate.acquire(run_dir)
    try:
        runstate.write_state(run_dir, RunState(state, run_name=run_dir.name, supervisor_pid=os.getpid(), **facts))
        yield
    finally:
        lock.release()


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory, dataset) -> Path:
    """A real run under a real supervisor: an exception at step 4, a SIGKILL at step 8, two restarts, success."""
    run_dir = make_run(tmp_path_factory.mktemp("crashed"), "crashed", config_text("crashed", dataset))
    result = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                            env={**os.environ, "TRAINCTL_FAULTS": "train_step:exception@4:once,train_step:sigkill@8:once"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


@pytest.fixture
def ended_run(crashed_run, tmp_path) -> Path:
    """A copy of the crashed run's folder, for a test to change."""
    return Path(shutil.copytree(crashed_run, tmp_path / "ended"))


def test_crash_evidence_is_named_only_when_it_holds_something(crashed_run):
    recorded = {e["attempt"]: e["data"] for e in events(crashed_run, Event.EXIT)}
    assert recorded[1]["failure"] == "exception" and recorded[2]["failure"] == "killed"
    empty = Path(recorded[2]["evidence"])    # a SIGKILL leaves no traceback: the fault log the journal names is empty
    assert empty.name == "attempt-002.fault.log" and empty.stat().st_size == 0
    st = gather(crashed_run)
    exception, killed = st.crashes
    assert exception.evidence == str(crashed_run / "evidence" / "attempt-001.error.json")
    assert killed.kind == "killed" and killed.evidence is None
    assert st.to_json()["crashes"][1]["evidence"] is None
    text = render(st)
    assert "evidence/attempt-001.error.json" in text and "fault.log" not in text


def test_evidence_is_found_in_a_moved_run_folder(tmp_path, dataset):
    run_dir = make_run(tmp_path, "moved", config_text("moved", dataset))
    assert run_worker(run_dir, faults="train_step:exception@2").returncode == ExitCode.INTERNAL_ERROR
    journal = Journal(run_dir)    # as the supervisor journals it: the evidence's path where the run was then
    journal.record(Event.EXIT, 1, 0, 2, failure="exception", evidence=str(error_json_path(run_dir, 1)))
    journal.close()
    moved = Path(shutil.move(run_dir, tmp_path / "elsewhere"))
    assert gather(moved).crashes[0].evidence == str(error_json_path(moved, 1))


def test_the_report_belongs_to_the_end_the_supervisor_recorded(ended_run):
    st = gather(ended_run)
    assert st.state == "succeeded" and st.report == str(ended_run / "report.md") and st.summary["goodput"]
    assert re.search(r"night .* goodput", render(st)) and "report.md" in render(st)
    # Taken by a new supervisor (a resume): the report and its summary are the old end's, not this run's.
    with supervised(ended_run, State.RUNNING, worker_pid=os.getpid(), attempt=4):
        st = gather(ended_run)
        assert st.state == "running" and st.report is None and st.summary is None
        text = render(st)
        assert "night" not in text and "goodput" not in text and "report.md" not in text
    # The supervisor died: stopped, but the report is still the old end's.
    st = gather(ended_run)
    assert st.state == "stopped" and st.recorded_state == "running" and st.report is None


def test_worker_memory_is_shown_only_while_a_worker_runs(ended_run):
    # The supervisor's last memory sample, as it stays in state.json after the run ended.
    sample = dataclasses.asdict(MemorySample(at=1.0, worker=3 * 2**30, available=8 * 2**30, total=16 * 2**30))
    runstate.write_state(ended_run, dataclasses.replace(runstate.read_state(ended_run), memory=sample))
    st = gather(ended_run)
    assert st.state == "succeeded" and st.memory == {} and MEMORY_ROW not in render(st)
    with supervised(ended_run, State.RUNNING, worker_pid=os.getpid(), attempt=4, memory=sample):
        st = gather(ended_run)
        assert st.memory["worker"] == 3 * 2**30 and "worker 3.00 GiB" in render(st)
    with supervised(ended_run, State.BACKOFF, worker_pid=None, attempt=4, memory=sample):
        st = gather(ended_run)    # between two attempts: no worker
        assert st.memory == {} and MEMORY_ROW not in render(st)


def test_the_step_stands_at_the_checkpoint_while_a_new_worker_boots(tmp_path, dataset):
    run_dir = make_run(tmp_path, "booting", config_text("booting", dataset))
    assert run_worker(run_dir, faults="train_step:sigkill@8").returncode == -signal.SIGKILL
    newest = newest_checkpoint(run_dir)
    assert newest is not None and 0 < newest.step < 8 and gather(run_dir).step == 8
    with supervised(run_dir, State.STARTING, attempt=2, worker_pid=os.getpid()):
        reporter = Reporter(run_dir, attempt=2, rung_index=0)   # the new worker's, as the worker writes it
        reporter.beat(Phase.BOOTING, force=True)
        assert read_heartbeat(run_dir).step == 0                 # it has not loaded its checkpoint yet
        st = gather(run_dir)
        assert st.step == newest.step and st.epoch is None
        reporter.beat(Phase.LOADING, force=True)
        assert gather(run_dir).step == newest.step
        reporter.beat(total_steps=18, steps_per_epoch=6, epochs=3, step=newest.step, epoch=newest.step // 6,
                      cursor=newest.step % 6 * 16, samples_seen=newest.step * 16, force=True)
        st = gather(run_dir)
        assert st.step == newest.step and st.epoch == newest.step // 6 and st.total_steps == 18
        reporter.beat(Phase.TRAINING, force=True, step=newest.step + 1)
        assert gather(run_dir).step == newest.step + 1


def test_without_a_checkpoint_the_last_known_step_stands_while_a_worker_boots(tmp_path, dataset):
    run_dir = make_run(tmp_path, "early", config_text("early", dataset))
    journal = Journal(run_dir)    # as the supervisor journals an attempt killed at step 2, before any checkpoint
    journal.record(Event.EXIT, 1, 0, 2, failure="killed", signal="SIGKILL", exit_code=None, evidence=None)
    journal.close()
    with supervised(run_dir, State.STARTING, attempt=2, worker_pid=os.getpid()):
        Reporter(run_dir, attempt=2, rung_index=0).beat(Phase.BOOTING, force=True)
        assert gather(run_dir).step == 2


def test_one_checkpoint_is_one_checkpoint(tmp_path, dataset):
    run_dir = make_run(tmp_path, "one", config_text("one", dataset))
    journal = Journal(run_dir)    # a short attempt, stopped after writing one checkpoint
    journal.record(Event.SUPERVISOR_START, pid=os.getpid())
    journal.record(Event.SPAWN, 1, 0, None, pid=os.getpid())
    journal.record(Event.EXIT, 1, 0, 3, failure="stopped", checkpoints_written=1)
    journal.record(Event.STATE, 1, 0, **{"from": "stopping", "to": "stopped", "reason": "stopped on request"})
    journal.close()
    runstate.write_state(run_dir, RunState(State.STOPPED, "stopped on request", run_name="one", attempt=1))
    report.write(run_dir, "stopped", "stopped on request", None)
    text = render(gather(run_dir))
    assert re.search(r"\b1 checkpoint\b", text) and "1 checkpoints" not in text, text


def test_a_new_supervisor_starting_does_not_show_the_previous_attempt_s_phase(ended_run):
    old = read_heartbeat(ended_run)
    assert old.phase is Phase.DONE and old.attempt == 3 and gather(ended_run).phase == "done"
    checkpoint_step = newest_checkpoint(ended_run).step
    # A resumed run's supervisor, before it spawns (state.json still names the last attempt), then after.
    for attempt, worker in ((3, None), (4, 2**22 + 7)):
        with supervised(ended_run, State.STARTING, attempt=attempt, worker_pid=worker):
            st = gather(ended_run)
            assert st.phase is None and st.loss is None and st.images_per_sec is None and st.eta_seconds is None
            assert st.step == checkpoint_step and st.total_steps == old.total_steps
            assert "done" not in render(st)
    with supervised(ended_run, State.STARTING, attempt=4, worker_pid=os.getpid()):
        Reporter(ended_run, attempt=4, rung_index=0).beat(Phase.BOOTING, force=True)   # the new worker speaks
        assert gather(ended_run).phase == "booting"
    with supervised(ended_run, State.BACKOFF, attempt=4, worker_pid=None):
        assert gather(ended_run).phase is None          # the crashed attempt's last word is not the run's now


@pytest.fixture
def orphan(tmp_path, dataset):
    """A worker that outlived its supervisor, still busy (a hang stands for a long checkpoint write)."""
    run_dir = make_run(tmp_path, "orphan", config_text("orphan", dataset))
    worker = subprocess.Popen([sys.executable, "-m", "trainctl.worker", "--run-dir", str(run_dir), "--attempt", "1"],
                              env={**os.environ, "TRAINCTL_FAULTS": "train_step:hang@2"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (hb := read_heartbeat(run_dir)) and hb.step == 2, 120, what="the worker at step 2")
        yield run_dir, worker
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def test_a_worker_that_outlived_its_supervisor_is_shown_and_then_not(orphan):
    run_dir, worker = orphan
    # The supervisor's last record, as it stays when it is SIGKILLed: running, with its worker's pid.
    runstate.write_state(run_dir, RunState(State.RUNNING, run_name="orphan", supervisor_pid=2**22 + 7,
                                           worker_pid=worker.pid, attempt=1))
    st = gather(run_dir)
    assert not st.supervisor_alive and st.state == "stopping" and st.recorded_state == "running"
    assert st.worker_pid == worker.pid and f"its worker (pid {worker.pid}) is still running" in st.reason
    assert "trainctl resume orphan" in st.reason and "STOPPING" in render(st)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    st = gather(run_dir)
    assert st.state == "stopped" and st.worker_pid is None and "supervisor not running" in st.reason


def test_list_shows_a_run_once_after_its_folder_is_moved_and_linked_back(tmp_path, dataset):
    from test_cli import trainctl
    run_dir = make_run(tmp_path, "moved", config_text("moved", dataset))
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "COLUMNS": "120", "TRAINCTL_FAULTS": ""}
    registry = tmp_path / "state" / "trainctl" / "runs.json"
    registry.parent.mkdir(parents=True)
    registry.write_text(json.dumps([str(run_dir)]))     # as `trainctl start` records it
    (tmp_path / "bigger-disk").mkdir()
    elsewhere = Path(shutil.move(run_dir, tmp_path / "bigger-disk" / "moved"))
    run_dir.symlink_to(elsewhere)
    listed = trainctl("list", "--json", env=env, cwd=tmp_path)
    assert [st["run_dir"] for st in json.loads(listed.stdout)] == [str(elsewhere)], listed.stdout + listed.stderr
    one = trainctl("status", "moved", "--json", env=env, cwd=tmp_path)    # one run, not an ambiguous name
    assert one.returncode == ExitCode.OK and json.loads(one.stdout)["run_dir"] == str(elsewhere), one.stderr
