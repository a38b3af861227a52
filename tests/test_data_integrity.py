"""Issue 17, items 2, 3 and 13: changed data is refused on resume, a vanished data source stops training rather
than train on blanks, and a symlink loop in a class folder is walked once."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import config_text, make_run, run_worker, wait_for

from trainctl.contract import manifest
from trainctl.contract.runfolder import DATA_MANIFEST_FILE
from trainctl.contract.config import ConfigError, load
from trainctl.contract.folders import scan
from trainctl.contract.protocol import CannotContinue, ExitCode, read_heartbeat
from trainctl.contract.runfolder import committed_checkpoints, error_json_path
from trainctl.worker.data import BadShare, likely_cause

EXT = (".jpg", ".png")
KILLED = -signal.SIGKILL


def copy_of(dataset, tmp_path):
    """A private copy of the session's training folder (copytree keeps modification times)."""
    train = tmp_path / "train"
    shutil.copytree(dataset[0], train)
    return train


def snapshot(train):
    folder = scan(train, EXT)
    return folder, manifest.build(folder)


# ---- item 13: each directory once -------------------------------------------------------------------------
def scan_in_a_subprocess(train) -> list[str]:
    """The scan in a child process with a deadline: an endless walk fails the test instead of hanging it."""
    code = ("import json, sys; from trainctl.contract.folders import scan; "
            "f = scan(sys.argv[1], ('.jpg', '.png')); print(json.dumps([f.classes, f.paths]))")
    result = subprocess.run([sys.executable, "-c", code, str(train)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_symlink_loop_in_a_class_folder_is_walked_once(tmp_path, dataset):
    train = copy_of(dataset, tmp_path)
    expected = scan(train, EXT)
    os.symlink(".", train / "circle" / "again")          # one loop: counted circle 41 times
    os.symlink(".", train / "circle" / "and_again")      # two loops: 2^40 paths, the scan never ended
    os.symlink("..", train / "square" / "up")             # a link back to the training folder itself
    os.symlink("../circle", train / "square" / "circles")  # a link across to another class folder
    classes, paths = scan_in_a_subprocess(train)
    assert classes == list(expected.classes)
    assert paths == list(expected.paths)   # each image once, under its own class, in the same order


def test_a_linked_folder_of_images_still_counts_once(tmp_path, dataset):
    train = copy_of(dataset, tmp_path)
    extra = tmp_path / "more-circles"
    shutil.copytree(train / "circle", extra)
    os.symlink(extra, train / "circle" / "more")   # a link to a folder outside the dataset: followed
    os.symlink(extra, train / "circle" / "same-more")   # ... once, whatever the number of links
    folder = scan(train, EXT)
    assert len(folder) == 96 + 24
    assert sum(1 for p in folder.paths if "/more/" in p) == 24 and not any("/same-more/" in p for p in folder.paths)


# ---- item 2: the data identity -----------------------------------------------------------------------------
def test_every_kind_of_change_is_named_with_counts(tmp_path, dataset):
    train = copy_of(dataset, tmp_path)
    folder, before = snapshot(train)
    (train / "circle" / "circle-0000.jpg").rename(train / "square" / "circle-0000.jpg")   # relabelled
    shutil.copyfile(train / "stripes" / "stripes-0001.jpg", train / "stripes" / "stripes-0002.jpg")   # replaced
    (train / "triangle" / "triangle-0005.jpg").unlink()                                  # removed
    shutil.copyfile(train / "triangle" / "triangle-0006.jpg", train / "triangle" / "new.jpg")   # added
    folder, after = snapshot(train)
    assert after.fingerprint != before.fingerprint
    changes = manifest.compare(before, after)
    assert changes.relabelled == ["circle/circle-0000.jpg → square/circle-0000.jpg"]
    assert changes.modified == ["stripes/stripes-0002.jpg"]
    assert changes.removed == ["triangle/triangle-0005.jpg"] and changes.added == ["triangle/new.jpg"]
    text = manifest.describe(changes)
    assert "1 relabelled" in text and "1 modified" in text and "1 removed" in text and "1 added" in text


def test_a_file_with_the_same_size_but_another_mtime_is_modified_and_the_cause_is_suggested(tmp_path, dataset):
    train = copy_of(dataset, tmp_path)
    _, before = snapshot(train)
    path = train / "circle" / "circle-0001.jpg"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    _, after = snapshot(train)
    text = manifest.describe(manifest.compare(before, after))
    assert text.startswith("1 modified") and "circle/circle-0001.jpg" in text and "cp without -p" in text


def test_many_changes_are_counted_and_only_a_few_named(tmp_path, dataset):
    train = copy_of(dataset, tmp_path)
    _, before = snapshot(train)
    for path in sorted((train / "square").glob("*.png")):
        path.unlink()
    _, after = snapshot(train)
    text = manifest.describe(manifest.compare(before, after))
    assert text.startswith("6 removed: square/") and "+3 more" in text


def test_the_same_data_passes_and_changed_data_is_refused_naming_the_difference(tmp_path, dataset):
    train = copy_of(dataset, tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    folder, before = snapshot(train)
    manifest.keep(run_dir, before, train)
    saved = manifest.identity(folder, before)
    manifest.check(saved, manifest.build(scan(train, EXT)), folder, run_dir)   # unchanged: passes
    (train / "circle" / "circle-0002.jpg").rename(train / "square" / "circle-0002.jpg")
    folder, after = snapshot(train)
    with pytest.raises(CannotContinue) as caught:
        manifest.check(saved, after, folder, run_dir)
    message = str(caught.value)
    assert caught.value.kind == "data_error"
    assert "1 relabelled" in message and "circle/circle-0002.jpg → square/circle-0002.jpg" in message
    assert "Fix:" in message and "config.toml" not in message and "\n" not in message


def test_a_checkpoint_without_a_fingerprint_compares_its_classes_and_count(tmp_path, dataset):
    """Checkpoints of older code stored the class list and image count only: they still resume on the same data,
    and a refusal shows the class difference (it used to show two lists cut to the same 57 characters)."""
    train = copy_of(dataset, tmp_path)
    folder, now = snapshot(train)
    old = {"classes": list(folder.classes), "num_samples": len(folder)}
    manifest.check(old, now, folder, tmp_path)   # the same data: passes without a file list
    shutil.copytree(train / "circle", train / "ellipse")
    folder, now = snapshot(train)
    with pytest.raises(CannotContinue) as caught:
        manifest.check(old, now, folder, tmp_path)
    message = str(caught.value)
    assert "classes added: ellipse" in message and "96 images then, 120 now" in message
    assert "config.toml" not in message


def test_class_difference_shows_what_differs():
    classes = [f"a_very_long_common_prefix_of_class_names_{i:03d}" for i in range(40)]
    assert manifest.class_difference(classes, classes[:-1]) == f"classes removed: {classes[-1]}"
    assert manifest.class_difference(classes, classes + ["zebra"]) == "classes added: zebra"


def test_a_resumed_worker_refuses_an_image_moved_to_another_class_and_resumes_once_it_is_back(tmp_path, dataset):
    train = copy_of(dataset, tmp_path)
    run_dir = make_run(tmp_path, "moved", config_text("moved", dataset, data={"train_dir": str(train)}))
    assert run_worker(run_dir, faults="train_step:sigkill@4").returncode == KILLED
    assert (run_dir / DATA_MANIFEST_FILE).exists()
    moved = train / "circle" / "circle-0003.png"
    moved.rename(train / "square" / moved.name)   # same classes, same count: what the old identity saw
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").glob("*")}
    result = run_worker(run_dir, attempt=2)
    assert result.returncode == ExitCode.CANNOT_CONTINUE, result.stdout + result.stderr
    error = json.loads(error_json_path(run_dir, 2).read_text())
    assert error["kind"] == "data_error"
    assert "circle/circle-0003.png → square/circle-0003.png" in error["message"], error["message"]
    assert "config.toml" not in error["message"] and "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").glob("*")} == before
    (train / "square" / moved.name).rename(moved)   # the data as it was (rename keeps the mtime)
    result = run_worker(run_dir, attempt=3)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr


# ---- item 3: a failing data source -----------------------------------------------------------------------
def test_a_step_with_more_than_the_share_of_unreadable_images_stops_before_its_forward_pass():
    share = BadShare(max_step_share=0.5, max_epoch_share=1.0, step_images=16)
    share.begin_step(epoch=0, step=3)
    assert share.count(8, [("a", "x")] * 8) is None           # 8 of 16: not more than half
    share.begin_step(epoch=0, step=4)
    assert share.count(8, [("a", "x")] * 4) is None
    fault = share.count(8, [("b", "file disappeared")] * 5)   # 9 of 16
    assert fault.startswith("9 of the 16 images of optimizer step 5 could not be read")


def test_the_epoch_share_is_judged_from_a_minimum_number_of_images():
    share = BadShare(max_step_share=1.0, max_epoch_share=0.05, step_images=10, epoch_min_images=100)
    for step in range(9):
        share.begin_step(0, step)
        assert share.count(10, [("f", "x")]) is None    # 10% of an epoch, but fewer than 100 images seen
    share.begin_step(0, 9)
    fault = share.count(10, [("f", "x")])
    assert fault is not None and "10 of the 100 images read so far in epoch 1" in fault
    share.begin_step(1, 10)   # a new epoch starts counting afresh
    assert share.count(10, [("f", "x")]) is None


def test_the_likely_cause_is_read_from_the_folder(tmp_path):
    root = tmp_path / "train"
    gone = [(str(root / "a" / f"{i}.jpg"), "file disappeared") for i in range(5)]
    assert likely_cause(root, gone).startswith(f"the folder {root} is gone")
    root.mkdir()
    vanished = likely_cause(root, gone)
    assert vanished.startswith("files vanished") and vanished.endswith("a/2.jpg, a/3.jpg, a/4.jpg (file disappeared)")
    mixed = likely_cause(root, gone[:1] + [(str(root / "b" / "x.jpg"), "PermissionError: denied")])
    assert "cannot be read" in mixed and "b/x.jpg (PermissionError: denied)" in mixed


def test_the_limits_are_validated(tmp_path, dataset):
    for value in ("nan", "1.5", "-0.1"):
        path = tmp_path / "c.toml"
        path.write_text(config_text("limits", dataset).replace("[data]", f"[data]\nmax_bad_share_step = {value}"))
        with pytest.raises(ConfigError, match=r"\[data\] max_bad_share_step"):
            load(path)


def test_a_training_folder_renamed_away_mid_run_is_a_data_error_not_a_success(tmp_path, dataset):
    train = copy_of(dataset, tmp_path)
    text = config_text("vanished", dataset, data={"train_dir": str(train)}, train={"epochs": 60},
                       checkpoint={"every_steps": 50}, profiles=[{"device": "cpu", "batch_size": 16}])
    run_dir = make_run(tmp_path, "vanished", text)
    env = {**os.environ, "TRAINCTL_FAULTS": ""}
    env.pop("TRAINCTL_SUPERVISOR_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "trainctl.worker", "--run-dir", str(run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: getattr(read_heartbeat(run_dir), "step", 0) >= 3, 120, what="training to start")
        train.rename(tmp_path / "train-away")
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.CANNOT_CONTINUE, out
    error = json.loads(error_json_path(run_dir, 0).read_text())
    assert error["kind"] == "data_error" and "is gone" in error["message"] and "Fix:" in error["message"]
    assert not (run_dir / "model.safetensors").exists()
    step = read_heartbeat(run_dir).step
    assert step < 60 * 6
    # The last good state is kept: the step that found the blanks was not trained, and a checkpoint holds
    # the boundary before it.
    assert committed_checkpoints(run_dir / "checkpoints")[-1].step == step
    assert f"checkpoint at step {step}" in error["message"]
    # At most one step with no more than half its images blank trained (allowed), then the stop.
    assert json.loads((run_dir / "bad_images.json").read_text())["count"] <= 8 + 16
