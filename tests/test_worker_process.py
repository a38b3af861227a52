"""The worker as a real process: killed and resumed, switched rung, signalled, fed bad data and bad configs."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import psutil
import pytest
from conftest import assert_same_weights, config_text, make_run, max_weight_difference, run_worker, wait_for, weights

from trainctl.contract.protocol import ExitCode, read_heartbeat
from trainctl.contract.runfolder import committed_checkpoints, error_json_path

KILLED = -signal.SIGKILL


def test_sigkill_at_random_moments_ends_bit_identical(tmp_path, dataset, reference_run):
    """Killed mid-step, mid-checkpoint-write and just after a commit, resumed each time: same weights."""
    rng = random.Random(os.environ.get("TRAINCTL_TEST_SEED", "20261126"))
    total = 18   # 6 steps per epoch x 3 epochs
    step_a, step_b = sorted(rng.sample(range(1, total), 2))
    faults = [f"train_step:sigkill@{step_a}:once", f"ckpt_bytes:sigkill@{rng.choice([6, 9, 12])}:once",
              f"ckpt_committed:sigkill@{rng.choice([3, 15])}:once", f"train_step:sigkill@{step_b}:once"]
    run_dir = make_run(tmp_path, "killed", config_text("killed", dataset))
    kills = 0
    for attempt in range(1, 10):
        result = run_worker(run_dir, attempt=attempt, faults=",".join(faults))
        if result.returncode == ExitCode.OK:
            break
        assert result.returncode == KILLED, result.stdout + result.stderr
        kills += 1
    assert kills >= 3, f"only {kills} kills happened ({faults})"
    assert_same_weights(run_dir, reference_run)


def test_the_final_model_loads_into_timm_with_its_labels(reference_run):
    import timm
    labels = json.loads((reference_run / "labels.json").read_text())
    assert labels["classes"] == ["circle", "square", "stripes", "triangle"]
    assert labels["index_to_class"]["3"] == "triangle"
    model = timm.create_model("test_vit", num_classes=len(labels["classes"]), img_size=32)
    model.load_state_dict(weights(reference_run / "model.safetensors"))   # strict: every key matches


def test_switching_rung_mid_epoch_matches_up_to_summation_order(tmp_path, dataset, reference_run):
    """Batch 8 x accum 2 until killed at step 16, then batch 4 x accum 4 from the newest checkpoint to the end."""
    run_dir = make_run(tmp_path, "switch", config_text("switch", dataset))
    assert run_worker(run_dir, rung=1, attempt=1, faults="train_step:sigkill@16:once").returncode == KILLED
    # A background write may start a step early to be durable on time; never more than every_steps (3) behind.
    newest = committed_checkpoints(run_dir / "checkpoints")[-1].step
    assert 16 - 3 <= newest <= 15
    result = run_worker(run_dir, rung=2, attempt=2)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert "batch 4 x accum 4" in result.stdout
    diff = max_weight_difference(run_dir / "model.safetensors", reference_run / "model.safetensors")
    print(f"max abs weight difference after {18 - newest} steps on the other rung: {diff:.3e}")
    assert diff < 1e-5


def test_unreadable_images_are_listed_and_training_finishes(tmp_path, dataset):
    train = tmp_path / "train"
    shutil.copytree(dataset[0], train)
    good = next((train / "circle").glob("*.jpg")).read_bytes()
    bad = {train / "circle" / "truncated.jpg": good[: len(good) // 3],
           train / "square" / "zero.jpg": b"",
           train / "stripes" / "notes.jpg": b"a text file with a picture's name\n"}
    for path, content in bad.items():
        path.write_bytes(content)
    text = config_text("bad-images", dataset, data={"train_dir": str(train)}, train={"epochs": 1})
    run_dir = make_run(tmp_path, "bad-images", text)
    result = run_worker(run_dir)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    listed = json.loads((run_dir / "bad_images.json").read_text())
    assert listed["count"] == 3 and set(listed["files"]) == {str(p) for p in bad}
    assert all(listed["files"].values())
    assert read_heartbeat(run_dir).bad_images == 3
    assert result.stdout.count("unreadable image") == 3   # each logged once


def test_sigusr1_checkpoints_and_continues_sigterm_checkpoints_and_stops(tmp_path, dataset):
    """... and the worker, which leaves by os._exit (no interpreter teardown), takes its loader processes with it."""
    text = config_text("signals", dataset, train={"epochs": 200}, checkpoint={"every_steps": 0},
                       profiles=[{"device": "cpu", "batch_size": 8, "num_workers": 1}])
    run_dir = make_run(tmp_path, "signals", text)
    env = {**os.environ, "TRAINCTL_FAULTS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "trainctl.worker", "--run-dir", str(run_dir), "--attempt", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: getattr(read_heartbeat(run_dir), "step", 0) >= 2, 120, what="training to start")
        loaders = psutil.Process(proc.pid).children(recursive=True)
        assert loaders   # the loader process (and multiprocessing's resource tracker, if any)
        proc.send_signal(signal.SIGUSR1)
        ck = wait_for(lambda: [c for c in committed_checkpoints(run_dir / "checkpoints")
                               if c.marker.get("requested")], 60, what="the requested checkpoint")
        requested = ck[0].step
        wait_for(lambda: getattr(read_heartbeat(run_dir), "step", 0) >= requested + 3, 60, what="training to continue")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.STOPPED, out
    newest = committed_checkpoints(run_dir / "checkpoints")[-1]
    # The checkpoint is at the step it stopped at ("epoch" when that step happened to end an epoch).
    assert newest.marker["reason"] in ("stop", "epoch") and newest.step == read_heartbeat(run_dir).step > requested
    assert "stopped at step" in out
    assert "returned" in read_heartbeat(run_dir).timings   # main() ran to its end (its finally) before os._exit
    # no loader process left behind (shut down before the exit, not orphaned)
    assert not [p for p in loaders if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("case", ["unknown_model", "missing_data", "empty_class", "changed_settings"])
def test_config_and_data_errors_exit_do_not_restart_and_write_nothing(tmp_path, dataset, case):
    train = tmp_path / "train"
    shutil.copytree(dataset[0], train)
    text = config_text(case, dataset, data={"train_dir": str(train)})
    run_dir = make_run(tmp_path, case, text)
    expect = {"unknown_model": "Did you mean 'test_vit", "missing_data": "does not exist",
              "empty_class": "has no images", "changed_settings": "different settings (lr"}[case]
    if case == "unknown_model":
        config = run_dir / "config.toml"
        config.write_text(config.read_text().replace('name = "test_vit"', 'name = "test_vitt"'))
    elif case == "missing_data":
        shutil.rmtree(train)
    elif case == "empty_class":
        (train / "unicorn").mkdir()
    else:
        assert run_worker(run_dir, faults="train_step:sigkill@4").returncode == KILLED
        config = run_dir / "config.toml"
        config.write_text(config.read_text().replace("lr = 0.001", "lr = 0.002"))
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").glob("*")} if case == "changed_settings" else {}
    result = run_worker(run_dir, attempt=2)
    assert result.returncode == ExitCode.CONFIG_ERROR, result.stdout + result.stderr
    error = json.loads(error_json_path(run_dir, 2).read_text())
    assert error["kind"] == "config_error" and expect in error["message"] and "Fix" in error["message"]
    assert expect in result.stderr and "Traceback" not in result.stderr
    assert not (run_dir / "model.safetensors").exists()
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").glob("*")} == before
