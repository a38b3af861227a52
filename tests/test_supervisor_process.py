"""The supervisor with real workers, really killed: signals, OOM, memory limits, hangs, crash loops, orphans."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
from conftest import LONG, assert_same_weights, config_text, events, finish, make_run, start_supervisor, wait_for

from trainctl.contract.lifecycle import Event
from trainctl.contract.protocol import ExitCode, Phase, read_heartbeat
from trainctl.contract.runfolder import committed_checkpoints, newest_checkpoint
from trainctl.supervisor import service
from trainctl.supervisor.process import run_processes
from trainctl.supervisor.runstate import read_state, supervisor_alive


def crashes(run_dir):
    return [e for e in events(run_dir, Event.EXIT) if e["data"]["failure"] not in ("done", "stopped")]


def training(run_dir, attempt: int, min_step: int = 0):
    """The heartbeat of `attempt` once it trains at or past `min_step`."""
    hb = read_heartbeat(run_dir)
    return hb if hb and hb.attempt == attempt and hb.phase is Phase.TRAINING and hb.step >= min_step else None


def newest_checkpoint_step(run_dir) -> int:
    newest = newest_checkpoint(run_dir)
    return newest.step if newest else 0


def torch_libraries(pid: int) -> list[str]:
    """The files of torch a running process has mapped (its native libraries, once `import torch` ran)."""
    return [m.path for m in psutil.Process(pid).memory_maps() if "libtorch" in m.path or "/torch/" in m.path]


def test_real_signals_are_classified_and_the_run_recovers_bit_identical(tmp_path, dataset, long_reference):
    run_dir = make_run(tmp_path, "signals", config_text("signals", dataset, train=LONG))
    proc = start_supervisor(run_dir)
    sent = []
    try:
        for attempt, sig in enumerate([signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS], start=1):
            spawn = wait_for(lambda: [e for e in events(run_dir, Event.SPAWN) if e["attempt"] == attempt], 60,
                             what=f"attempt {attempt} to start")[0]
            start = spawn["step"] or 0
            # past a newly committed checkpoint (writes are in the background), so each attempt makes progress
            wait_for(lambda: newest_checkpoint_step(run_dir) > start, 120, what=f"a checkpoint from attempt {attempt}")
            hb = wait_for(lambda: training(run_dir, attempt, start + 4), 120, what=f"attempt {attempt} training")
            if attempt == 1:   # the supervisor never loads torch: checked on the running process itself
                assert torch_libraries(proc.pid) == [] and torch_libraries(hb.pid)
            os.kill(hb.pid, sig)
            sent.append((sig, hb.pid))
            wait_for(lambda: len(crashes(run_dir)) == attempt, 60, what=f"the crash of attempt {attempt}")
        out = finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    found = [(c["data"]["failure"], c["data"]["signal"]) for c in crashes(run_dir)]
    # the signal sent, also when faulthandler's stack dump then faulted beside the background checkpoint writer
    # (seen in CI for SIGABRT and SIGBUS: the process died of SIGSEGV after writing "Fatal Python error: Aborted")
    assert found == [("killed", "SIGKILL"), ("native_crash", "SIGSEGV"), ("native_crash", "SIGABRT"),
                     ("native_crash", "SIGBUS")], (found, out)
    aborted = (run_dir / "evidence" / "attempt-003.fault.log").read_text()
    assert aborted.startswith("Fatal Python error: Aborted"), aborted    # the SIGABRT was taken first
    assert "Fatal Python error" in (run_dir / "evidence" / "attempt-002.fault.log").read_text()
    spawns = events(run_dir, Event.SPAWN)
    assert len(spawns) == 5 and all(s["step"] for s in spawns[1:])   # each restart began from a checkpoint
    assert read_state(run_dir).state == "succeeded"
    assert_same_weights(run_dir, long_reference)


def test_simulated_mps_oom_steps_down_with_the_same_effective_batch(tmp_path, dataset):
    run_dir = make_run(tmp_path, "oom", config_text("oom", dataset, train={"epochs": 1}))
    out = finish(start_supervisor(run_dir, faults="train_step:mps_oom@4:rung1"))
    crash = crashes(run_dir)[0]["data"]
    assert crash["failure"] == "oom" and "MPS backend out of memory" in crash["detail"]
    assert [s["data"]["rung"]["batch_size"] for s in events(run_dir, Event.SPAWN)] == [8, 4]
    assert events(run_dir, Event.STEP_DOWN)[0]["data"]["to"] == 1
    hb = read_heartbeat(run_dir)
    assert hb.batch_size * hb.grad_accum == 16 and hb.grad_accum == 4
    assert read_state(run_dir).state == "succeeded", out


def test_soft_memory_limit_steps_down_and_loses_no_work(tmp_path, dataset):
    text = config_text("soft", dataset, train={"epochs": 4}, checkpoint={"every_steps": 0},
                       supervisor={"memory_soft_limit": "1.6GB", "memory_hard_limit": "6GB"})
    run_dir = make_run(tmp_path, "soft", text)
    out = finish(start_supervisor(run_dir, faults="train_step:leak:rung1"))
    assert read_state(run_dir).state == "succeeded", out
    assert events(run_dir, Event.MEMORY_SOFT_LIMIT)
    assert crashes(run_dir)[0]["data"]["failure"] == "memory_limit"
    stopped_at = crashes(run_dir)[0]["step"]
    second = events(run_dir, Event.SPAWN)[1]
    assert second["rung"] == 1 and second["step"] == stopped_at    # resumed exactly where it stopped


def test_hard_memory_limit_kills_and_steps_down(tmp_path, dataset):
    text = config_text("hard", dataset, train={"epochs": 1},
                       supervisor={"memory_soft_limit": "", "memory_hard_limit": "2.5GB"})
    run_dir = make_run(tmp_path, "hard", text)
    out = finish(start_supervisor(run_dir, faults="train_step:grow_memory@4:rung1"))
    assert events(run_dir, Event.MEMORY_HARD_LIMIT)
    crash = crashes(run_dir)[0]["data"]
    assert crash["failure"] == "memory_limit" and crash["signal"] == "SIGKILL"
    assert events(run_dir, Event.SPAWN)[1]["rung"] == 1 and read_state(run_dir).state == "succeeded", out


def test_a_stopped_worker_is_detected_as_hung_and_recovers(tmp_path, dataset):
    text = config_text("hang", dataset, train=LONG, supervisor={"hang_timeout_seconds": 3})
    run_dir = make_run(tmp_path, "hang", text)
    proc = start_supervisor(run_dir)
    try:
        hb = wait_for(lambda: training(run_dir, 1, 2), 120, what="training")
        os.kill(hb.pid, signal.SIGSTOP)
        detected = wait_for(lambda: events(run_dir, Event.HANG_DETECTED), 120, what="hang detection")[0]
        out = finish(proc)
    finally:
        proc.kill()
    # Never before the timeout (how soon after it is the fake-clock loop test's to check, not a loaded machine's).
    assert detected["data"]["silent_seconds"] >= 3 and detected["data"]["phase"] == "training"
    assert crashes(run_dir)[0]["data"]["failure"] == "hang"
    assert "Fatal Python error: Aborted" in (run_dir / "evidence" / "attempt-001.fault.log").read_text()
    assert read_state(run_dir).state == "succeeded", out


def test_a_crash_loop_fails_in_bounded_time_naming_the_step_and_its_images(tmp_path, dataset):
    run_dir = make_run(tmp_path, "loop", config_text("loop", dataset))
    proc = start_supervisor(run_dir, faults="train_step:exception@2")
    out = finish(proc)
    state = read_state(run_dir)
    assert proc.returncode == ExitCode.FAILED
    assert state.state == "failed" and "ladder exhausted" in state.reason and "step 2" in state.reason, out
    assert ".jpg" in state.reason or ".png" in state.reason      # the files of that batch
    assert len(events(run_dir, Event.SPAWN)) == 4                # bounded: two at that step on each rung
    give_up = events(run_dir, Event.GIVE_UP)[0]["data"]
    assert "injected fault" in give_up["evidence"]


def test_one_supervisor_per_run_orphans_exit_and_a_stale_lock_does_not_block(tmp_path, dataset):
    run_dir = make_run(tmp_path, "lock", config_text("lock", dataset, train={"epochs": 40}))
    first = start_supervisor(run_dir)
    try:
        hb = wait_for(lambda: training(run_dir, 1, 2), 120, what="training")
        first.send_signal(signal.SIGUSR1)                  # "checkpoint now", passed on to the worker
        wait_for(lambda: [c for c in committed_checkpoints(run_dir / "checkpoints")
                          if c.marker.get("requested")], 30, what="the requested checkpoint")
        assert events(run_dir, Event.CHECKPOINT_REQUESTED) and first.poll() is None
        second = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == ExitCode.RUNNING and f"pid {first.pid}" in second.stdout + second.stderr
        first.kill()                                       # SIGKILL: no chance to clean up
        first.wait()
        psutil.Process(hb.pid).wait(timeout=120)           # the orphan notices and exits on its own...
        wait_for(lambda: not run_processes(run_dir), 60, what="no process of the run left")
    finally:
        first.kill()
    newest = newest_checkpoint(run_dir)
    assert newest.step == read_heartbeat(run_dir).step     # ...after a checkpoint of the step it stopped at
    assert "(supervisor gone)" in (run_dir / "logs" / "worker.log").read_text()
    assert not supervisor_alive(run_dir) and (run_dir / "supervisor.lock").exists()
    third = start_supervisor(run_dir)                      # the stale lock file does not block resuming
    out = finish(third)
    assert third.returncode == 0 and read_state(run_dir).state == "succeeded", out
    assert events(run_dir, Event.SPAWN)[-1]["step"] == newest.step


def test_a_warm_standby_takes_over_and_leaves_with_the_supervisor(tmp_path, dataset, long_reference):
    text = config_text("warm", dataset, train=LONG, supervisor={"warm_standby": True})
    run_dir = make_run(tmp_path, "warm", text)
    proc = start_supervisor(run_dir)
    try:
        hb = wait_for(lambda: training(run_dir, 1, 4), 120, what="training")
        standby = wait_for(lambda: [p for p in run_processes(run_dir) if "--standby" in p.cmdline()], 60,
                           what="the standby")[0]
        os.kill(hb.pid, signal.SIGKILL)
        second = wait_for(lambda: [e for e in events(run_dir, Event.SPAWN) if e["attempt"] == 2], 60,
                          what="attempt 2")[0]
        assert second["data"]["pid"] == standby.pid            # the warm worker took over
        wait_for(lambda: training(run_dir, 2, second["step"] + 1), 60, what="attempt 2 training")
        timings = read_heartbeat(run_dir).timings
        assert "go" in timings and timings["go"] - timings["imported"] > 0   # imported long before the crash
        out = finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0 and read_state(run_dir).state == "succeeded", out
    assert_same_weights(run_dir, long_reference)
    wait_for(lambda: not run_processes(run_dir), 15, what="the last standby to leave with the supervisor")


def service_run(run_dir, faults: str) -> subprocess.CompletedProcess:
    """What systemd and launchd start: `trainctl service run RUN`."""
    env = {**os.environ, "TRAINCTL_FAULTS": faults}
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run([sys.executable, "-m", "trainctl.supervisor.command", "service", "run", str(run_dir)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_supervisor_that_crashes_stops_the_worker_at_a_checkpoint_and_the_service_resumes_it(
        tmp_path, dataset, reference_run):
    """A bug in the supervisor (injected: an exception in its loop) is not the run's failure: it exits 70,
    which the unit and the plist restart, with the worker stopped at a checkpoint; the next `service run`
    resumes from it, and the run ends bit-identical to one that never saw the error."""
    run_dir = make_run(tmp_path, "svc-error", config_text("svc-error", dataset))
    faults = "supervisor:exception@6:once"
    first = service_run(run_dir, faults)
    assert first.returncode == ExitCode.INTERNAL_ERROR == 70, first.stdout + first.stderr
    assert "injected fault: an exception in the supervisor" in first.stdout and "Traceback" in first.stdout
    state = read_state(run_dir)
    assert state.state == "stopped" and state.reason.startswith("supervisor error (RuntimeError: injected fault")
    error, = events(run_dir, Event.SUPERVISOR_ERROR)
    stopped_at = newest_checkpoint_step(run_dir)
    assert 6 <= stopped_at == error["step"] == read_heartbeat(run_dir).step   # it checkpointed where it stopped
    assert crashes(run_dir) == []                                             # the run itself never failed
    wait_for(lambda: not run_processes(run_dir), 60, what="no process of the run left")
    assert f"{ExitCode.INTERNAL_ERROR:d}" not in service.unit("/python").split("RestartPreventExitStatus=")[1].split("\n")[0]
    second = service_run(run_dir, faults)
    assert second.returncode == 0 and read_state(run_dir).state == "succeeded", second.stdout + second.stderr
    assert events(run_dir, Event.SPAWN)[-1]["step"] == stopped_at
    assert_same_weights(run_dir, reference_run)


def test_a_supervisor_killed_in_a_crash_loop_gives_up_after_the_same_budget(tmp_path, dataset):
    """max_restarts_per_profile = 3 on a one-rung ladder: 4 failed attempts, then `failed` — also when the
    supervisor is SIGKILLed after the second and started again (it rebuilds its history from the journal)."""
    text = config_text("budget", dataset, supervisor={"backoff_seconds": [3], "same_step_limit": 9},
                       profiles=[{"device": "cpu", "batch_size": 8}])
    run_dir = make_run(tmp_path, "budget", text)
    faults = "train_step:exception@2"
    first = start_supervisor(run_dir, faults)
    try:
        wait_for(lambda: len(crashes(run_dir)) == 2 and getattr(read_state(run_dir), "state", None) == "backoff", 240,
                 what="the backoff after the second failure")
    finally:
        first.kill()                                       # SIGKILL: a reboot, the OOM killer...
        first.wait()
    second = start_supervisor(run_dir, faults)
    out = finish(second)
    assert second.returncode == ExitCode.FAILED, out
    assert len(events(run_dir, Event.SPAWN)) == 3 + 1, out   # not 2 + a fresh budget of 4
    assert "4 failures on rung 1 without progress" in read_state(run_dir).reason
