"""The supervisor with real workers, really killed: signals, OOM, memory limits, hangs, crash loops, orphans."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from trainctl.supervisor.process import run_processes
from trainctl.supervisor.runstate import read_state, supervisor_alive
from trainctl.worker.protocol import committed_checkpoints, read_heartbeat

from conftest import LONG, assert_same_weights, config_text, events, make_run, wait_for


def start_supervisor(run_dir, faults: str = "") -> subprocess.Popen:
    env = {**os.environ, "TRAINCTL_FAULTS": faults}
    return subprocess.Popen([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return out


def crashes(run_dir):
    return [e for e in events(run_dir, "exit") if e["data"]["failure"] not in ("done", "stopped")]


def training(run_dir, attempt: int, min_step: int = 0):
    """The heartbeat of `attempt` once it trains at or past `min_step`."""
    hb = read_heartbeat(run_dir) or {}
    return hb if hb.get("attempt") == attempt and hb.get("phase") == "training" and hb.get("step", 0) >= min_step else None


def newest_checkpoint_step(run_dir) -> int:
    found = committed_checkpoints(run_dir / "checkpoints")
    return found[-1].step if found else 0


def test_real_signals_are_classified_and_the_run_recovers_bit_identical(tmp_path, dataset, long_reference):
    run_dir = make_run(tmp_path, "signals", config_text("signals", dataset, replace=LONG))
    proc = start_supervisor(run_dir)
    sent = []
    try:
        for attempt, sig in enumerate([signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS], start=1):
            spawn = wait_for(lambda: [e for e in events(run_dir, "spawn") if e["attempt"] == attempt], 60,
                             what=f"attempt {attempt} to start")[0]
            start = spawn["step"] or 0
            # past a newly committed checkpoint (writes are in the background), so each attempt makes progress
            wait_for(lambda: newest_checkpoint_step(run_dir) > start, 120, what=f"a checkpoint from attempt {attempt}")
            hb = wait_for(lambda: training(run_dir, attempt, start + 4), 120, what=f"attempt {attempt} training")
            os.kill(hb["pid"], sig)
            sent.append((sig, hb["pid"]))
            wait_for(lambda: len(crashes(run_dir)) == attempt, 60, what=f"the crash of attempt {attempt}")
        out = finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    found = crashes(run_dir)
    assert [(c["data"]["failure"], c["data"]["signal"]) for c in found] == [  # noqa: E501
        ("killed", "SIGKILL"), ("native_crash", "SIGSEGV"), ("native_crash", "SIGABRT"), ("native_crash", "SIGBUS")], (
        found, out)
    assert "Fatal Python error" in (run_dir / "evidence" / "attempt-002.fault.log").read_text()
    spawns = events(run_dir, "spawn")
    assert len(spawns) == 5 and all(s["step"] for s in spawns[1:])   # each restart began from a checkpoint
    assert read_state(run_dir)["state"] == "succeeded"
    assert_same_weights(run_dir, long_reference)


def test_simulated_mps_oom_steps_down_with_the_same_effective_batch(tmp_path, dataset):
    run_dir = make_run(tmp_path, "oom", config_text("oom", dataset, replace={"epochs = 3": "epochs = 1"}))
    out = finish(start_supervisor(run_dir, faults="train_step:mps_oom@4:rung0"))
    crash = crashes(run_dir)[0]["data"]
    assert crash["failure"] == "oom" and "MPS backend out of memory" in crash["detail"]
    assert [s["data"]["rung"]["batch_size"] for s in events(run_dir, "spawn")] == [8, 4]
    assert events(run_dir, "step_down")[0]["data"]["to"] == 1
    hb = read_heartbeat(run_dir)
    assert hb["batch_size"] * hb["grad_accum"] == 16 and hb["grad_accum"] == 4
    assert read_state(run_dir)["state"] == "succeeded", out


def test_soft_memory_limit_steps_down_and_loses_no_work(tmp_path, dataset):
    text = config_text("soft", dataset, replace={"epochs = 3": "epochs = 4", "every_steps = 3": "every_steps = 0"},
                       supervisor_extra='memory_soft_limit = "1.6GB"\nmemory_hard_limit = "6GB"')
    run_dir = make_run(tmp_path, "soft", text)
    out = finish(start_supervisor(run_dir, faults="train_step:leak:rung0"))
    assert read_state(run_dir)["state"] == "succeeded", out
    assert events(run_dir, "memory_soft_limit")
    assert crashes(run_dir)[0]["data"]["failure"] == "memory_limit"
    stopped_at = crashes(run_dir)[0]["step"]
    second = events(run_dir, "spawn")[1]
    assert second["profile"] == 1 and second["step"] == stopped_at    # resumed exactly where it stopped


def test_hard_memory_limit_kills_and_steps_down(tmp_path, dataset):
    text = config_text("hard", dataset, replace={"epochs = 3": "epochs = 1"},
                       supervisor_extra='memory_soft_limit = ""\nmemory_hard_limit = "2.5GB"')
    run_dir = make_run(tmp_path, "hard", text)
    out = finish(start_supervisor(run_dir, faults="train_step:grow_memory@4:rung0"))
    assert events(run_dir, "memory_hard_limit")
    crash = crashes(run_dir)[0]["data"]
    assert crash["failure"] == "memory_limit" and crash["signal"] == "SIGKILL"
    assert events(run_dir, "spawn")[1]["profile"] == 1 and read_state(run_dir)["state"] == "succeeded", out


def test_a_stopped_worker_is_detected_as_hung_and_recovers(tmp_path, dataset):
    text = config_text("hang", dataset, replace={**LONG, "hang_timeout_seconds = 60": "hang_timeout_seconds = 3"})
    run_dir = make_run(tmp_path, "hang", text)
    proc = start_supervisor(run_dir)
    try:
        hb = wait_for(lambda: training(run_dir, 1, 2), 120, what="training")
        os.kill(hb["pid"], signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: events(run_dir, "hang_detected"), 30, what="hang detection")
        detected = time.monotonic() - stopped
        out = finish(proc)
    finally:
        proc.kill()
    assert 3 <= detected <= 3 + 2.5, detected
    assert crashes(run_dir)[0]["data"]["failure"] == "hang"
    assert "Fatal Python error: Aborted" in (run_dir / "evidence" / "attempt-001.fault.log").read_text()
    assert read_state(run_dir)["state"] == "succeeded", out


def test_a_crash_loop_fails_in_bounded_time_naming_the_step_and_its_images(tmp_path, dataset):
    run_dir = make_run(tmp_path, "loop", config_text("loop", dataset))
    started = time.monotonic()
    out = finish(start_supervisor(run_dir, faults="train_step:exception@2"))
    elapsed = time.monotonic() - started
    state = read_state(run_dir)
    assert state["state"] == "failed" and "ladder exhausted" in state["reason"] and "step 2" in state["reason"], out
    assert ".jpg" in state["reason"] or ".png" in state["reason"]      # the files of that batch
    assert len(events(run_dir, "spawn")) == 4 and elapsed < 150
    give_up = events(run_dir, "give_up")[0]["data"]
    assert "injected fault" in give_up["evidence"]


def test_one_supervisor_per_run_orphans_exit_and_a_stale_lock_does_not_block(tmp_path, dataset):
    run_dir = make_run(tmp_path, "lock", config_text("lock", dataset, replace={"epochs = 3": "epochs = 40"}))
    first = start_supervisor(run_dir)
    try:
        hb = wait_for(lambda: training(run_dir, 1, 2), 120, what="training")
        first.send_signal(signal.SIGUSR1)                  # "checkpoint now", passed on to the worker
        wait_for(lambda: [c for c in committed_checkpoints(run_dir / "checkpoints")
                          if c.marker.get("requested")], 30, what="the requested checkpoint")
        assert events(run_dir, "checkpoint_requested") and first.poll() is None
        second = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and f"pid {first.pid}" in second.stdout + second.stderr
        first.kill()                                       # SIGKILL: no chance to clean up
        first.wait()
        worker = psutil.Process(hb["pid"])
        gone_in = time.monotonic()
        worker.wait(timeout=15)                            # the orphan notices and exits on its own
        gone_in = time.monotonic() - gone_in
        wait_for(lambda: not run_processes(run_dir), 10, what="no process of the run left")
    finally:
        first.kill()
    assert gone_in < 5
    newest = committed_checkpoints(run_dir / "checkpoints")[-1]
    assert newest.step == read_heartbeat(run_dir)["step"]  # the orphan checkpointed the step it stopped at
    assert "(supervisor gone)" in (run_dir / "logs" / "worker.log").read_text()
    assert not supervisor_alive(run_dir) and (run_dir / "supervisor.lock").exists()
    third = start_supervisor(run_dir)                      # the stale lock file does not block resuming
    out = finish(third)
    assert third.returncode == 0 and read_state(run_dir)["state"] == "succeeded", out
    assert events(run_dir, "spawn")[-1]["step"] == newest.step


def test_a_warm_standby_takes_over_and_leaves_with_the_supervisor(tmp_path, dataset, long_reference):
    text = config_text("warm", dataset, replace=LONG, supervisor_extra="warm_standby = true")
    run_dir = make_run(tmp_path, "warm", text)
    proc = start_supervisor(run_dir)
    try:
        hb = wait_for(lambda: training(run_dir, 1, 4), 120, what="training")
        standby = wait_for(lambda: [p for p in run_processes(run_dir) if "--standby" in p.cmdline()], 30,
                           what="the standby")[0]
        os.kill(hb["pid"], signal.SIGKILL)
        second = wait_for(lambda: [e for e in events(run_dir, "spawn") if e["attempt"] == 2], 60, what="attempt 2")[0]
        assert second["data"]["pid"] == standby.pid            # the warm worker took over
        wait_for(lambda: training(run_dir, 2, second["step"] + 1), 60, what="attempt 2 training")
        timings = read_heartbeat(run_dir)["timings"]
        assert "go" in timings and timings["go"] - timings["imported"] > 0   # imported long before the crash
        out = finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0 and read_state(run_dir)["state"] == "succeeded", out
    assert_same_weights(run_dir, long_reference)
    wait_for(lambda: not run_processes(run_dir), 15, what="the last standby to leave with the supervisor")
