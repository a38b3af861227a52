"""`trainctl resume` and racing starts: a refused command changes nothing, and says only what it means."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import LONG, config_text, make_run, wait_for
from test_cli import trainctl

from trainctl.contract.config import load
from trainctl.contract.protocol import ExitCode
from trainctl.contract.runfolder import newest_checkpoint
from trainctl.supervisor import launch, runstate
from trainctl.supervisor.journal import read_events


@pytest.fixture
def env(tmp_path):
    """An isolated home for the run registry (as in test_cli)."""
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "COLUMNS": "120", "TRAINCTL_FAULTS": ""}


def stopped_run(tmp_path, dataset, env, name):
    """A run stopped on request after its first checkpoints (state, report and all), by a real supervisor."""
    run_dir = make_run(tmp_path, name, config_text(name, dataset, train=LONG))
    supervisor = subprocess.Popen([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: newest_checkpoint(run_dir), 180, what="a first checkpoint")
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=180)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    assert runstate.read_state(run_dir).state == "stopped"
    return run_dir


def stop(run_dir) -> None:
    """SIGTERM the supervisor this test started (it stops its worker at a checkpoint) and wait until it is gone."""
    saved = runstate.read_state(run_dir)
    if runstate.supervisor_alive(run_dir) and saved and saved.supervisor_pid:
        os.kill(saved.supervisor_pid, signal.SIGTERM)
        wait_for(lambda: not runstate.supervisor_alive(run_dir), 240, what="the supervisor to stop")


def test_a_refused_resume_config_changes_nothing_and_what_may_change_does(tmp_path, dataset, env):
    run_dir = stopped_run(tmp_path, dataset, env, "rs")
    newest = newest_checkpoint(run_dir)
    kept = ("config.toml", "state.json", "report.md")
    before = {name: (run_dir / name).read_bytes() for name in kept}
    journal = len(read_events(run_dir))
    edited = tmp_path / "edited.toml"
    for change, words in [({"epochs": 13}, "[train] epochs: 12 → 13"), ({"lr": 0.01}, "[train] lr: 0.001 → 0.01")]:
        edited.write_text(config_text("rs", dataset, train={**LONG, **change}))
        result = trainctl("resume", "rs", "--config", str(edited), env=env, cwd=tmp_path)
        assert result.returncode == ExitCode.BAD_CONFIG, result.stdout + result.stderr
        message = result.stderr
        assert f"{edited} changes settings" in message and words in message, message
        assert f"Fix: put them back in {edited}" in message and "[model] weights" in message
        assert "Traceback" not in message and len(message.strip().splitlines()) == 1
        assert {name: (run_dir / name).read_bytes() for name in kept} == before   # nothing written
        assert len(read_events(run_dir)) == journal and not runstate.supervisor_alive(run_dir)
    # The ladder, [supervisor] and [checkpoint] may change: applied, and the run resumes from its checkpoint.
    edited.write_text(config_text("rs", dataset, train=LONG, checkpoint={"keep_last": 4},
                                  supervisor={"hang_timeout_seconds": 90},
                                  profiles=[{"device": "cpu", "batch_size": 4}]))
    try:
        result = trainctl("resume", "rs", "--config", str(edited), env=env, cwd=tmp_path)
        assert result.returncode == ExitCode.OK, result.stdout + result.stderr
        assert f"resumed rs from step {newest.step} (checkpoint {newest.path})" in result.stdout
        assert "started run" not in result.stdout
        frozen = load(run_dir / "config.toml")
        assert frozen.supervisor.hang_timeout_seconds == 90 and frozen.checkpoint.keep_last == 4
        assert [p.batch_size for p in frozen.profiles] == [4]
        wait_for(lambda: runstate.read_state(run_dir).state == "succeeded", 300, what="the resumed run to finish")
    finally:
        stop(run_dir)
    spawns = [e for e in read_events(run_dir) if e["kind"] == "spawn"]
    assert spawns[-1]["step"] == newest.step and spawns[-1]["data"]["rung"]["batch_size"] == 4


def test_a_resume_with_changed_settings_and_no_checkpoint_is_allowed(tmp_path, dataset, env):
    """Nothing depends on the settings before the first checkpoint: a never-started run takes the edited config."""
    run_dir = make_run(tmp_path, "fresh", config_text("fresh", dataset))
    edited = tmp_path / "edited.toml"
    edited.write_text(config_text("fresh", dataset, train={"epochs": 2}))
    try:
        result = trainctl("resume", str(run_dir), "--config", str(edited), "--rung", "3", env=env, cwd=tmp_path)
        assert result.returncode == ExitCode.USAGE and "rungs 1..2" in result.stderr   # refused: still nothing written
        assert load(run_dir / "config.toml").train.epochs == 3
        result = trainctl("resume", str(run_dir), "--config", str(edited), env=env, cwd=tmp_path)
        assert result.returncode == ExitCode.OK, result.stdout + result.stderr
        assert "resumed fresh from the start (no checkpoint yet)" in result.stdout
        assert load(run_dir / "config.toml").train.epochs == 2
    finally:
        stop(run_dir)


def test_the_loser_of_a_start_race_hears_only_who_holds_the_run(tmp_path, dataset, env):
    run_dir = make_run(tmp_path, "race", config_text("race", dataset, train=LONG))
    (tmp_path / "race.toml").write_text(config_text("race", dataset, train=LONG))
    try:
        assert launch.start_detached(run_dir, None) == ExitCode.OK      # the winner: its lines fill supervisor.log
        winner = runstate.read_state(run_dir).supervisor_pid
        with pytest.raises(launch.Refused) as lost:                      # a second supervisor, as a racing start's
            launch.start_detached(run_dir, None)
        assert lost.value.args == (f"race is already running (supervisor pid {winner})", ExitCode.RUNNING)
        late = trainctl("start", "--config", "race.toml", env=env, cwd=tmp_path)   # one that comes a moment later
        assert late.returncode == ExitCode.RUNNING
        assert late.stderr.strip() == f"refused: race is already running (supervisor pid {winner})"
    finally:
        stop(run_dir)
