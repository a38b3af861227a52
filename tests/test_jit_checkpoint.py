"""The checkpoint at the moment of failure (issue 20 §1): a caught exception or out-of-memory error writes the state
of the last completed optimizer step before the worker exits, so such a failure loses at most the step it came in."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from trainctl.contract.lifecycle import Event, State
from trainctl.contract.protocol import ExitCode, Heartbeat, Phase
from trainctl.contract.runfolder import committed_checkpoints, error_json_path
from trainctl.supervisor.report import summarize
from trainctl.supervisor.runstate import read_state
from trainctl.supervisor.status import gather
from trainctl.supervisor.watch import Limits, Record, Seen, Watch, take_heartbeat
from trainctl.worker.checkpoint import verify

from conftest import assert_same_weights, config_text, events, make_run, run_worker

FAR = {"every_steps": 50}                   # no scheduled checkpoint near the failure (only at epoch ends: 6, 12, 18)
CNN = {"name": "test_resnet", "img_size": 40}   # BatchNorm: every train-mode forward pass moves its running statistics
AT = 5                                      # the failure comes in the step after step 5 ...
MID_STEP = f"micro_batch:exception@{AT}:once"   # ... after the first of its two micro-batches (batch 8 x accum 2)


def test_an_exception_mid_step_resumes_at_that_step_and_ends_bit_identical(tmp_path, dataset):
    reference = make_run(tmp_path, "ref", config_text("ref", dataset, model=CNN, checkpoint=FAR))
    assert run_worker(reference).returncode == ExitCode.OK
    run_dir = make_run(tmp_path, "jit", config_text("jit", dataset, model=CNN, checkpoint=FAR))
    failed = run_worker(run_dir, faults=MID_STEP)
    assert failed.returncode == ExitCode.INTERNAL_ERROR, failed.stdout + failed.stderr
    assert json.loads(error_json_path(run_dir, 1).read_text())["kind"] == "exception"
    marker = committed_checkpoints(run_dir / "checkpoints")[-1].marker
    assert (marker["step"], marker["reason"], marker["failure"]) == (AT, "at_failure", f"exception at step {AT}")
    assert gather(run_dir).last_checkpoint.at_failure == f"exception at step {AT}"
    resumed = run_worker(run_dir, attempt=2)
    assert resumed.returncode == ExitCode.OK, resumed.stdout + resumed.stderr
    assert f"resumed from step-{AT:09d}.pt: epoch 1, step {AT}," in resumed.stdout, resumed.stdout
    assert_same_weights(run_dir, reference)   # buffers too: the failed step's BatchNorm updates were undone


def test_an_out_of_memory_error_steps_down_and_the_next_rung_resumes_at_the_failed_step(tmp_path, dataset):
    run_dir = make_run(tmp_path, "oom", config_text("oom", dataset, checkpoint=FAR))   # rungs: 8, then 4 x 4
    env = {**os.environ, "TRAINCTL_FAULTS": f"micro_batch:mps_oom@{AT}:once"}
    result = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == ExitCode.OK and read_state(run_dir).state == State.SUCCEEDED, result.stdout + result.stderr
    crashed = [e for e in events(run_dir, "exit") if e["data"]["failure"] != "done"]
    assert [(e["data"]["failure"], e["step"]) for e in crashed] == [("oom", AT)]
    assert [(e["data"]["from"], e["data"]["to"]) for e in events(run_dir, "step_down")] == [(0, 1)]
    last = events(run_dir, "spawn")[-1]
    assert (last["rung"], last["step"]) == (1, AT)   # nothing before the failed step is done again
    saved = [(e["step"], e["data"]["failure"]) for e in events(run_dir, "checkpoint") if e["data"].get("failure")]
    assert saved == [(AT, f"out of memory at step {AT}")]
    summary = json.loads((run_dir / "report.json").read_text())
    assert (summary["checkpoints_at_failure"], summary["steps_saved_at_failure"]) == (1, AT)
    assert "1 at a failure" in (run_dir / "report.md").read_text()


def test_a_failing_checkpoint_at_failure_keeps_the_original_error_and_the_previous_checkpoint(tmp_path, dataset):
    text = config_text("twice", dataset, checkpoint={"async_write": False})   # every 3 steps: step 3 is committed
    run_dir = make_run(tmp_path, "twice", text)
    failed = run_worker(run_dir, faults=f"micro_batch:mps_oom@{AT}:once,ckpt_bytes:enospc@{AT}:once")
    assert failed.returncode == ExitCode.OUT_OF_MEMORY, failed.stdout + failed.stderr
    error = json.loads(error_json_path(run_dir, 1).read_text())
    assert error["kind"] == "oom" and "MPS backend out of memory" in error["message"]
    assert "checkpoint at failure could not be written" in failed.stderr, failed.stderr
    kept = committed_checkpoints(run_dir / "checkpoints")
    assert [c.step for c in kept] == [3] and all(verify(c) is None for c in kept)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]


def ev(t, kind, attempt=None, step=None, **data):
    return {"time": float(t), "kind": kind, "attempt": attempt, "rung": 0, "step": step, "data": data}


def test_the_report_counts_checkpoints_at_failure_and_the_steps_they_saved():
    night = [ev(0, "supervisor_start"), ev(0, "spawn", 1, 0), ev(5, "worker_ready", 1, 0), ev(20, "checkpoint", 1, 50),
             ev(30, "checkpoint", 1, 73, reason="at_failure", failure="exception at step 73"),
             ev(30, "exit", 1, 73, failure="exception"), ev(31, "spawn", 2, 73), ev(35, "worker_ready", 2, 73),
             ev(40, "checkpoint", 2, 80, reason="at_failure", failure="out of memory at step 80"),
             ev(40, "exit", 2, 80, failure="oom"), ev(41, "spawn", 3, 80), ev(45, "worker_ready", 3, 80),
             ev(60, "checkpoint", 3, 100), ev(60, "exit", 3, 100, failure="done"), ev(61, "state", 3, to="succeeded")]
    s = summarize(night)
    assert (s["checkpoints_at_failure"], s["steps_saved_at_failure"]) == (2, (73 - 50) + (80 - 73))
    assert s["redone_seconds"] == 0


def test_the_journal_says_which_checkpoint_was_taken_at_a_failure():
    watch = Watch(attempt=1, rung_index=0, rung_text="cpu batch 8", restarts=0, start_step=0, last_progress_at=0.0,
                  touched_at=0.0, ready=True, checkpoint_step=50)
    last = {"step": 73, "path": "p", "taken": 9.5, "reason": "at_failure", "failure": "exception at step 73"}
    beat = Heartbeat(pid=9, attempt=1, rung_index=0, beat=7, phase=Phase.TRAINING, step=73, last_checkpoint=last)
    limits = Limits(hang_timeout=300, startup_timeout=600, stop_timeout=120)
    _, out = take_heartbeat(watch, Seen(now=1.0, heartbeat=beat, state=State.RUNNING), limits)
    recorded = [c for c in out if isinstance(c, Record) and c.event == Event.CHECKPOINT]
    assert [(c.step, c.data["reason"], c.data["failure"]) for c in recorded] == [(73, "at_failure", "exception at step 73")]
