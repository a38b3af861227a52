"""Self-calibrating hang detection with real processes: a stopped worker on a run with fast steps is caught
within the auto timeout (learned from its own steps, far below the old fixed 300 s), the values in force are
in `status --json`, and what was learned is in the journal for a restarted supervisor."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import config_text, events, make_run, wait_for

from trainctl.contract.config import ConfigError, load
from trainctl.contract.lifecycle import Event
from trainctl.contract.protocol import Phase, read_heartbeat
from trainctl.supervisor.journal import read_events
from trainctl.supervisor.runstate import read_state
from trainctl.supervisor.status import gather
from trainctl.supervisor.watch import HANG_FLOOR_SECONDS, Limits, recall_pace


def start_supervisor(run_dir) -> subprocess.Popen:
    env = {**os.environ, "TRAINCTL_FAULTS": ""}
    return subprocess.Popen([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def calibrated(run_dir):
    """The first attempt's heartbeat once it trains under a hang timeout learned from its steps."""
    saved, hb = read_state(run_dir), read_heartbeat(run_dir)
    how = ((saved.hang_timeout or {}) if saved else {}).get("how", "")
    ok = how.startswith("auto:") and "first steps" not in how
    return hb if ok and hb and hb.attempt == 1 and hb.phase is Phase.TRAINING else None


def test_a_stopped_worker_with_fast_steps_is_caught_by_the_auto_timeout(tmp_path, dataset):
    text = config_text("autohang", dataset, train={"epochs": 40}, supervisor={"hang_timeout_seconds": "auto"})
    run_dir = make_run(tmp_path, "autohang", text)
    proc = start_supervisor(run_dir)
    try:
        hb = wait_for(lambda: calibrated(run_dir), 180, what="a calibrated hang timeout")
        os.kill(hb.pid, signal.SIGSTOP)
        detected = wait_for(lambda: events(run_dir, Event.HANG_DETECTED), 240, what="hang detection")[0]["data"]
        wait_for(lambda: events(run_dir, Event.EXIT), 60, what="the hung attempt's exit")
        status = gather(run_dir).to_json()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    # The auto timeout in force: the floor or 5 x the slowest recent step, far below the old fixed 300 s.
    assert detected["how"].startswith("auto:") and HANG_FLOOR_SECONDS <= detected["timeout"] < 300, detected
    assert detected["silent_seconds"] >= detected["timeout"] and detected["phase"] == "training"
    assert events(run_dir, Event.EXIT)[0]["data"]["failure"] == "hang", out
    assert status["hang_timeout"]["how"].startswith(("auto:", "fixed:")) and status["startup_timeout"]["seconds"] > 0
    # What a restarted supervisor starts from: the steps and the boot of this run, from the journal.
    pace = recall_pace(read_events(run_dir))
    assert pace.steps and pace.boots and max(pace.steps) < detected["timeout"]


def test_the_timeouts_take_auto_or_a_number_and_nothing_else(tmp_path, dataset):
    for i, value in enumerate(("auto", 45, 2.5)):
        name = f"cfg{i}"
        run_dir = make_run(tmp_path, name, config_text(name, dataset, supervisor={
            "hang_timeout_seconds": value, "startup_timeout_seconds": value}))
        cfg = load(run_dir / "config.toml")      # the frozen copy keeps it
        assert cfg.supervisor.hang_timeout_seconds == value and cfg.supervisor.startup_timeout_seconds == value
        limits = Limits.of(cfg, 2**34)
        assert limits.hang_timeout == (None if value == "auto" else value) == limits.startup_timeout
    for key in ("hang_timeout_seconds", "startup_timeout_seconds"):
        with pytest.raises(ConfigError, match=rf'{key} = .soon. is neither "auto" nor a number of seconds\. Fix: '):
            make_run(tmp_path, "bad", config_text("bad", dataset, supervisor={key: "soon"}))
    with pytest.raises(ConfigError, match=r"hang_timeout_seconds = 0\.0 is out of range"):
        make_run(tmp_path, "zero", config_text("zero", dataset, supervisor={"hang_timeout_seconds": 0}))


@pytest.mark.soak
def test_a_run_whose_every_step_is_slower_than_the_floor_is_not_killed_for_being_slow(tmp_path, dataset):
    """Every step takes 35 s (the `slow` fault), longer than the 30 s floor: the first two pass under the start-up
    allowance, the rest under 5 x the slowest step seen. (`pytest -m soak`: about three minutes of sleeping.)"""
    run_dir = make_run(tmp_path, "slow", config_text("slow", dataset, train={"epochs": 1, "effective_batch_size": 24},
                                                      supervisor={"hang_timeout_seconds": "auto"}))
    env = {**os.environ, "TRAINCTL_FAULTS": "train_step:slow"}
    result = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and read_state(run_dir).state == "succeeded", result.stdout + result.stderr
    assert events(run_dir, "hang_detected") == [] and [e["data"]["failure"] for e in events(run_dir, "exit")] == ["done"]
    learned = [e["data"]["hang_timeout"] for e in events(run_dir, "checkpoint") if "slowest recent step" in
               e["data"].get("hang_timeout", {}).get("how", "")]
    assert learned and learned[-1]["seconds"] >= 5 * 35, events(run_dir, "checkpoint")
