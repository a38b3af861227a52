"""Back to training soon after a crash (issue 22, recovery): no backoff after a crash that followed progress, a warm
standby that built the model before it was told GO, and a sanity check that runs once per run and rung — with
every recovered run still bit-identical to one that never failed."""
from __future__ import annotations

import os
import signal

import pytest
import timm
import torch
from conftest import (LONG, assert_same_weights, config_text, events, finish, make_run, run_worker, start_supervisor,
                      wait_for)
from safetensors.torch import save_file

from trainctl.contract.config import load
from trainctl.contract.lifecycle import Event
from trainctl.contract.protocol import ExitCode, Phase, read_heartbeat
from trainctl.contract.runfolder import SANITY_FILE, newest_checkpoint, read_json
from trainctl.supervisor.process import run_processes
from trainctl.supervisor.runstate import read_state
from trainctl.worker.boot import passed_before, record_pass, sanity_key

PASSED, SKIPPED = "sanity check passed", "sanity check skipped"
SLOW_BACKOFF = {"backoff_seconds": [30]}   # a restart that waited would show in the journal (and the clock)


def training(run_dir, attempt: int, min_step: int = 0):
    """The heartbeat of `attempt` once it trains at or past `min_step`."""
    hb = read_heartbeat(run_dir)
    return hb if hb and hb.attempt == attempt and hb.phase is Phase.TRAINING and hb.step >= min_step else None


def standby_of(run_dir):
    """The waiting standby worker of the run, if there is one."""
    return [p for p in run_processes(run_dir) if "--standby" in p.cmdline()]


def attempt_log(run_dir, attempt: int) -> str:
    """Attempt `attempt`'s part of logs/worker.log (from its header to the next one)."""
    text = (run_dir / "logs" / "worker.log").read_text()
    return text.split(f"=== attempt {attempt}, ")[1].split("\n=== attempt ")[0]


def test_the_sanity_check_runs_once_per_rung_and_again_on_another_rung_or_config(tmp_path, dataset):
    run_dir = make_run(tmp_path, "sanity", config_text("sanity", dataset, train=LONG))   # rungs: 8, then 4 x 2
    first = run_worker(run_dir, rung=1, attempt=1, faults="train_step:sigkill@4:once")
    assert first.returncode == -signal.SIGKILL and PASSED in first.stdout, first.stdout + first.stderr
    assert read_json(run_dir / SANITY_FILE)["0"]["step"] == 0
    again = run_worker(run_dir, rung=1, attempt=2, faults="train_step:sigkill@8:once")
    assert again.returncode == -signal.SIGKILL, again.stdout + again.stderr
    assert PASSED not in again.stdout and f"{SKIPPED}: it passed on rung 1 (cpu) with this config at step 0" \
        in again.stdout, again.stdout
    lower = run_worker(run_dir, rung=2, attempt=3, faults="train_step:sigkill@12:once")
    assert lower.returncode == -signal.SIGKILL and PASSED in lower.stdout and SKIPPED not in lower.stdout, lower.stdout
    assert sorted(read_json(run_dir / SANITY_FILE)) == ["0", "1"]
    lower_again = run_worker(run_dir, rung=2, attempt=4, faults="train_step:sigkill@16:once")
    assert SKIPPED in lower_again.stdout and PASSED not in lower_again.stdout, lower_again.stdout
    # a resume --config (here: a setting that may change on resume) is another config: the check runs again
    make_run(tmp_path, "sanity", config_text("sanity", dataset, train={**LONG, "log_every_steps": 3}))
    changed = run_worker(run_dir, rung=2, attempt=5)
    assert changed.returncode == ExitCode.OK, changed.stdout + changed.stderr
    assert PASSED in changed.stdout and SKIPPED not in changed.stdout, changed.stdout


def test_a_crash_after_progress_restarts_at_once_on_the_prebuilt_standby_and_ends_bit_identical(
        tmp_path, dataset, long_reference):
    text = config_text("quick", dataset, train=LONG, supervisor={**SLOW_BACKOFF, "warm_standby": True})
    run_dir = make_run(tmp_path, "quick", text)
    proc = start_supervisor(run_dir)
    try:
        committed = wait_for(lambda: newest_checkpoint(run_dir), 120, what="a committed checkpoint").step
        standby = wait_for(lambda: standby_of(run_dir), 60, what="the standby")[0]
        hb = wait_for(lambda: training(run_dir, 1, committed + 1), 120, what="training past it")
        os.kill(hb.pid, signal.SIGKILL)   # after real progress: a newer checkpoint than the attempt started from
        second = wait_for(lambda: [e for e in events(run_dir, Event.SPAWN) if e["attempt"] == 2], 60,
                          what="attempt 2")[0]
        out = finish(proc, timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0 and read_state(run_dir).state == "succeeded", out
    crash = [e for e in events(run_dir, Event.EXIT) if e["attempt"] == 1][0]
    assert crash["data"]["failure"] == "killed" and crash["data"]["progressed"]
    assert [e["data"]["delay"] for e in events(run_dir, Event.RESTART)] == [0]   # no backoff
    assert second["data"]["pid"] == standby.pid and second["step"] > 0             # the warm worker resumed
    log = attempt_log(run_dir, 2)
    assert f"{SKIPPED}: it passed on rung 1" in log and PASSED not in log, log
    assert_same_weights(run_dir, long_reference)   # the prebuilt model, the skipped check: nothing changed the run


def test_a_fresh_start_on_the_standby_builds_from_the_seed_and_the_weights_file(tmp_path, dataset):
    """No checkpoint yet when the worker dies: the standby's model (built without weights) must not be used."""
    torch.manual_seed(123)
    source = timm.create_model("test_vit", num_classes=4, img_size=32)
    weights = tmp_path / "start.safetensors"
    save_file({k: v.clone() for k, v in source.state_dict().items()}, str(weights))
    model = {"name": "test_vit", "img_size": 32, "weights": str(weights)}
    reference = make_run(tmp_path, "fresh-ref", config_text("fresh-ref", dataset, model=model))
    assert run_worker(reference).returncode == ExitCode.OK
    run_dir = make_run(tmp_path, "fresh", config_text("fresh", dataset, model=model,
                                                      supervisor={"warm_standby": True}))
    proc = start_supervisor(run_dir, faults="train_step:hang@1:once")   # before the first checkpoint (step 3)
    try:
        hb = wait_for(lambda: training(run_dir, 1, 1), 120, what="attempt 1 at its hang")
        standby = wait_for(lambda: standby_of(run_dir), 60, what="the standby")[0]
        assert newest_checkpoint(run_dir) is None
        os.kill(hb.pid, signal.SIGKILL)
        out = finish(proc, timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0 and read_state(run_dir).state == "succeeded", out
    second = [e for e in events(run_dir, Event.SPAWN) if e["attempt"] == 2][0]
    assert second["data"]["pid"] == standby.pid and second["step"] is None   # the standby, from the start
    assert_same_weights(run_dir, reference)


@pytest.mark.parametrize("field,other", [("rung_index", 1), ("config", "0" * 64), ("device", "cuda:0"),
                                         ("software", "torch 0.0, timm 0.0")])
def test_a_passed_sanity_check_holds_only_for_its_rung_config_device_and_software(tmp_path, dataset, field, other):
    path = tmp_path / "c.toml"
    path.write_text(config_text("key", dataset))
    key = sanity_key(load(path), 0, torch.device("cpu"))
    assert passed_before(tmp_path, key) is None                       # nothing recorded yet
    record_pass(tmp_path, key, step=12)
    assert passed_before(tmp_path, key)["step"] == 12
    assert passed_before(tmp_path, {**key, field: other}) is None
