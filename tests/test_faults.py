"""The fault matrix: every point of a checkpoint write, supervisor deaths, races, a full disk, awkward
data, foreign checkpoints — real processes, real signals, real files."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from trainctl.contract.lifecycle import State
from trainctl.contract.protocol import ExitCode, Phase, read_heartbeat
from trainctl.contract.runfolder import committed_checkpoints, error_json_path
from trainctl.supervisor.process import run_processes
from trainctl.supervisor.runstate import read_state

from conftest import LONG, assert_same_weights, config_text, events, make_run, run_worker, wait_for

ONE_RUNG = [{"device": "cpu", "batch_size": 8}]                       # the ladder: batch 8 only
EVERY = 3                                                              # [checkpoint] every_steps


@pytest.mark.parametrize("background", [True, False], ids=["async", "sync"])
def test_a_kill_at_every_point_of_a_checkpoint_write_loses_at_most_one_interval(tmp_path, dataset, reference_run,
                                                                                background):
    """SIGKILL before the write, mid-write, written-not-synced, synced-not-renamed, renamed-not-dir-synced,
    committed-not-marked and just after the marker (each attempt dies at the next point of its first
    checkpoint write); plus a Python exception and an OOM error — one rung, so the end must be
    bit-identical to the run that never crashed."""
    points = ["ckpt_begin", "ckpt_bytes", "ckpt_written", "ckpt_synced", "ckpt_renamed", "ckpt_committed",
              "ckpt_marked"]
    spec = [f"{point}:sigkill:once" for point in points]
    spec += ["train_step:exception@4:once", "train_step:cpu_oom@13:once"]
    text = config_text("phases", dataset, profiles=ONE_RUNG, checkpoint={"async_write": background},
                       supervisor={"max_restarts_per_profile": 20, "same_step_limit": 20})
    run_dir = make_run(tmp_path, "phases", text)
    env = {**os.environ, "TRAINCTL_FAULTS": ",".join(spec)}
    result = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == ExitCode.OK and read_state(run_dir).state == State.SUCCEEDED, result.stdout
    exits = events(run_dir, "exit")
    spawns = {e["attempt"]: e["step"] or 0 for e in events(run_dir, "spawn")}
    crashed = [e for e in exits if e["data"]["failure"] != "done"]
    assert len(crashed) == len(spec), [e["data"]["detail"] for e in crashed]
    for e in crashed:
        lost = e["step"] - spawns[e["attempt"] + 1]     # steps re-done by the next attempt
        assert 0 <= lost <= EVERY, (e["data"], lost)
    kinds = sorted(e["data"]["failure"] for e in crashed)
    assert kinds == sorted(["killed"] * 7 + ["exception", "oom"])
    for c in committed_checkpoints(run_dir / "checkpoints"):
        assert c.path.stat().st_size == c.marker["size"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert_same_weights(run_dir, reference_run)


def test_supervisor_and_worker_killed_at_once_then_resumed(tmp_path, dataset, long_reference):
    run_dir = make_run(tmp_path, "both", config_text("both", dataset, train=LONG))
    proc = subprocess.Popen([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        hb = wait_for(lambda: (h := read_heartbeat(run_dir)) and h.phase == Phase.TRAINING and h.step >= 8 and h,
                      120, what="training")
        os.kill(hb.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
    wait_for(lambda: not run_processes(run_dir), 60, what="nothing of the run left")
    resumed = subprocess.run([sys.executable, "-m", "trainctl.supervisor.command", "resume", str(run_dir),
                              "--foreground"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == ExitCode.OK and read_state(run_dir).state == State.SUCCEEDED, resumed.stdout + resumed.stderr
    assert events(run_dir, "spawn")[-1]["step"] >= 6
    assert_same_weights(run_dir, long_reference)


def test_two_resumes_racing_for_one_run_start_one_supervisor(tmp_path, dataset):
    run_dir = make_run(tmp_path, "race", config_text("race", dataset, train={"epochs": 40}))
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    cmd = [sys.executable, "-m", "trainctl.supervisor.command", "resume", str(run_dir)]
    racers = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        outcomes = sorted(p.wait(timeout=180) for p in racers)
        supervisors = [p for p in run_processes(run_dir) if "trainctl.supervisor" in " ".join(p.cmdline())]
        assert outcomes == [ExitCode.OK, ExitCode.RUNNING], [p.communicate() for p in racers]   # one started, one refused
        assert len(supervisors) == 1
    finally:
        subprocess.run([sys.executable, "-m", "trainctl.supervisor.command", "stop", str(run_dir)], env=env,
                       capture_output=True, timeout=180)
        for p in run_processes(run_dir):
            p.kill()
    assert read_state(run_dir).state == State.STOPPED


def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG instead
    return apply


def test_no_space_mid_write_keeps_the_previous_checkpoint(tmp_path, dataset):
    """A real write failure from the kernel (RLIMIT_FSIZE → EFBIG) in the middle of a checkpoint."""
    run_dir = make_run(tmp_path, "nospace", config_text("nospace", dataset))
    assert run_worker(run_dir, faults="train_step:sigkill@8").returncode == -signal.SIGKILL
    before = [(c.step, c.marker["crc32"]) for c in committed_checkpoints(run_dir / "checkpoints")]
    assert len(before) == 2                                  # keep_last = 2
    result = run_worker(run_dir, attempt=2, preexec_fn=_file_size_limit(1 << 20))
    assert result.returncode == ExitCode.DISK_FULL, result.stdout + result.stderr
    error = json.loads(error_json_path(run_dir, 2).read_text())
    assert error["kind"] == "disk_full" and "File too large" in error["message"]
    assert [(c.step, c.marker["crc32"]) for c in committed_checkpoints(run_dir / "checkpoints")] == before
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert run_worker(run_dir, attempt=3).returncode == ExitCode.OK   # space back: it carries on


def awkward_dataset(root):
    """Every kind of image a real folder holds, good and bad, in two classes."""
    rng = np.random.default_rng(0)
    bad = {}
    for label in ("a", "b"):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"rgb{i}.jpg")
    a, b = root / "a", root / "b"
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("CMYK").save(a / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(a / "gray16.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(a / "gray.png")
    pal = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("P", palette=Image.ADAPTIVE)
    pal.save(b / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(rng.integers(0, 255, (30, 60, 3), dtype=np.uint8)).save(b / "rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(b / "one.png")
    good = (a / "rgb0.jpg").read_bytes()
    (a / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (a / "zero.jpg").write_bytes(b"")
    (b / "notes.jpg").write_text("not a picture")
    Image.new("1", (10_000, 10_000)).save(b / "huge.png")
    for name in ("a/truncated.jpg", "a/zero.jpg", "b/notes.jpg", "b/huge.png"):
        bad[str(root / name)] = True
    return bad


def test_an_awkward_dataset_trains_to_the_end_and_lists_exactly_the_bad_files(tmp_path, dataset):
    bad = awkward_dataset(tmp_path / "train")
    text = config_text("awkward", dataset, data={"train_dir": str(tmp_path / "train"), "val_dir": str(tmp_path / "train")},
                       train={"effective_batch_size": 8}, profiles=[{"device": "cpu", "batch_size": 4}])
    run_dir = make_run(tmp_path, "awkward", text)
    result = run_worker(run_dir)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    listed = json.loads((run_dir / "bad_images.json").read_text())["files"]
    assert set(listed) == set(bad), listed
    assert "max_image_pixels" in listed[str(tmp_path / "train" / "b" / "huge.png")]


def test_a_checkpoint_from_another_model_is_refused(tmp_path, dataset):
    donor = make_run(tmp_path, "donor", config_text("donor", dataset, train={"epochs": 1}))
    assert run_worker(donor).returncode == ExitCode.OK
    text = config_text("other", dataset, model={"name": "test_resnet"})
    run_dir = make_run(tmp_path, "other", text)
    shutil.copytree(donor / "checkpoints", run_dir / "checkpoints")
    result = run_worker(run_dir)
    assert result.returncode == ExitCode.CONFIG_ERROR
    message = json.loads(error_json_path(run_dir, 1).read_text())["message"]
    assert "different settings" in message and "model" in message and "test_vit" in message
    assert not (run_dir / "model.safetensors").exists()


def test_a_checkpoint_request_arriving_during_a_snapshot_is_answered_not_swallowed(tmp_path, dataset):
    """SIGUSR1 lands while a snapshot is being taken (here: as step 3's synchronous write begins). It asks
    for one more checkpoint; the snapshot in progress must not wipe it out. Found under load in CI: the
    request flag was cleared after the write had been handed over, losing a request that came meanwhile."""
    text = config_text("usr1", dataset, train={"epochs": 2}, checkpoint={"async_write": False})
    run_dir = make_run(tmp_path, "usr1", text)
    result = run_worker(run_dir, faults="ckpt_begin:sigusr1@3:once")
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    commits = [line for line in result.stdout.splitlines() if "committed" in line]
    assert any("checkpoint at step 3 committed" in line and "interval" in line for line in commits), commits
    assert any("checkpoint at step 4 committed" in line and "requested" in line for line in commits), commits


def test_an_armed_fault_fires_once_per_arming_in_whichever_process_reaches_it(tmp_path):
    """The benches' faults at a chosen moment (bench/goodput.py --catchable): armed by a file, fired once each."""
    from trainctl.contract.faults import Injector, arm, parse
    injector = Injector(parse("train_step:exception:armed,train_step:cpu_oom:armed"), tmp_path)
    assert injector.due("train_step", 3) == []
    arm(tmp_path, "cpu_oom")
    assert injector.due("train_step", 4) == ["cpu_oom"] and injector.due("train_step", 5) == []
    arm(tmp_path, "exception")
    arm(tmp_path, "exception")   # arming twice before it fires is one firing
    assert injector.due("micro_batch", 6) == [] and injector.due("train_step", 6) == ["exception"]
    assert injector.due("train_step", 7) == []
