"""Issue 18, [data] val_split: a stratified, seed-determined share of train_dir held out as the validation set,
part of the run's identity."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
from conftest import config_text, make_run, run_worker

from trainctl.contract import config as configlib
from trainctl.contract import fixed
from trainctl.contract import folders, fsio, manifest, split
from trainctl.contract.config import ConfigError
from trainctl.contract.folders import Folder
from trainctl.contract.protocol import CannotContinue, ExitCode, read_heartbeat
from trainctl.contract.runfolder import DATA_MANIFEST_FILE, METRICS_FILE, error_json_path

EXT = (".jpg", ".png")
SIZES = {"a": 10, "b": 3, "c": 2, "d": 1, "e": 7, "f": 40}


def listing(root: str = "/data/train", sizes: dict = SIZES, shuffle_seed: int | None = None) -> Folder:
    """A scanned folder of made-up paths (the split reads paths only), in scan order or shuffled."""
    classes = tuple(sorted(sizes))
    samples = [(f"{root}/{c}/{c}{i:03d}.jpg", k) for k, c in enumerate(classes) for i in range(sizes[c])]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(samples)
    return Folder(Path(root), classes, tuple(p for p, _ in samples), tuple(k for _, k in samples))


def held_names(folder: Folder, fraction: float = 0.25, seed: int = 7) -> set[str]:
    return {split.relative(folder, p) for p in split.hold_out(folder, fraction, seed)[1].paths}


# ---- the split itself ------------------------------------------------------------------------------------
def test_each_class_holds_out_its_rounded_share_at_least_one_and_never_all():
    train, held = split.hold_out(listing(), 0.25, seed=7)
    per_class = {c: held.labels.count(k) for k, c in enumerate(held.classes)}
    # 10 x 0.25 = 2.5 → 3 (half up); 3 → 0.75 → 1; 2 → 0.5 → 1 (and never both); 1 image: kept; 7 → 1.75 → 2; 40 → 10
    assert per_class == {"a": 3, "b": 1, "c": 1, "d": 0, "e": 2, "f": 10}
    assert [split.held_out_count(0.01, n) for n in (1, 2, 3, 100, 149, 150)] == [0, 1, 1, 1, 1, 2]
    assert [split.held_out_count(0.99, n) for n in (2, 3, 100)] == [1, 2, 99]
    assert len(train) + len(held) == sum(SIZES.values()) and not set(train.paths) & set(held.paths)
    assert train.classes == held.classes == tuple(sorted(SIZES))
    assert train.held_out.count == len(held) == 17 and train.held_out.fraction == 0.25 and held.held_out is None
    folder = listing()
    assert list(train.paths) == [p for p in folder.paths if p not in set(held.paths)]   # the scan's order kept


def test_the_split_depends_on_seed_and_relative_paths_only():
    base = held_names(listing())
    assert held_names(listing(shuffle_seed=1)) == base == held_names(listing(shuffle_seed=2))   # any listing order
    assert held_names(listing(root="/Volumes/usb/photos")) == base   # train_dir mounted elsewhere
    assert held_names(listing(), seed=8) != base
    assert split.hold_out(listing(shuffle_seed=3), 0.25, 7)[0].held_out == split.hold_out(listing(), 0.25, 7)[0].held_out


def with_file(folder: Folder, cls: str, name: str) -> Folder:
    """`folder` with one more file, `cls/name`, at its place in the scan order."""
    label = folder.classes.index(cls)
    samples = sorted([*zip(folder.paths, folder.labels), (f"{folder.root}/{cls}/{name}", label)])
    return Folder(folder.root, folder.classes, tuple(p for p, _ in samples), tuple(k for _, k in samples))


def test_a_file_added_to_one_class_leaves_the_other_classes_alone_and_moves_at_most_one_file_of_its_own():
    before = held_names(listing())
    outcomes = set()
    for n in range(40):   # 'f': 40 → 41 images, still 10 held out (10.25)
        after = held_names(with_file(listing(), "f", f"new{n}.jpg"))
        assert {x for x in after if not x.startswith("f/")} == {x for x in before if not x.startswith("f/")}
        moved = after ^ before
        assert moved == set() or (len(moved) == 2 and f"f/new{n}.jpg" in after), moved
        outcomes.add(len(moved))
    assert outcomes == {0, 2}   # both cases happened: the new file trains, or it takes another's place


def test_the_motivating_run_holds_out_a_fifth_of_103938_images():
    sizes = {f"class{k:03d}": 1000 + (37 * k) % 80 for k in range(100)}   # about 1039 images each
    sizes["class000"] += 103_938 - sum(sizes.values())
    train, held = split.hold_out(listing(sizes=sizes), 0.2, seed=42)
    assert len(train) + len(held) == 103_938
    assert abs(len(held) - 0.2 * 103_938) <= 50   # each class rounds on its own: within 0.5 per class
    assert len(held) == sum(split.held_out_count(0.2, n) for n in sizes.values())


def test_a_split_that_holds_out_nothing_is_refused():
    with pytest.raises(ConfigError) as caught:
        split.hold_out(listing(sizes={"a": 1, "b": 1}), 0.3, seed=0)
    assert "[data] val_split" in str(caught.value) and "Fix:" in str(caught.value)


# ---- the config --------------------------------------------------------------------------------------------
def load(tmp_path, dataset, **data) -> configlib.Config:
    path = tmp_path / "run.toml"
    path.write_text(config_text("split", dataset, data=data))
    return configlib.load(path)


def test_val_split_with_val_dir_is_refused_naming_both_keys(tmp_path, dataset):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, dataset, val_split=0.2)   # the tests' config has a val_dir
    message = str(caught.value)
    assert "[data] val_split" in message and "[data] val_dir" in message and "Fix:" in message
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"\[data\] val_split"):
            load(tmp_path, dataset, val_dir=None, val_split=bad)
    assert load(tmp_path, dataset).data.val_split == 0.0
    assert load(tmp_path, dataset, val_dir=None, val_split=0.2).data.val_split == 0.2


def test_resume_with_another_val_split_is_refused_by_the_cli_check(tmp_path, dataset):
    frozen = load(tmp_path, dataset, val_dir=None, val_split=0.25)
    assert fixed.resume_changes(frozen, load(tmp_path, dataset, val_dir=None, val_split=0.5)) == \
        ["[data] val_split: 0.25 → 0.5"]
    assert fixed.resume_changes(frozen, load(tmp_path, dataset, val_dir=None, val_split=0.25)) == []


def test_train_and_val_and_a_steps_files_leave_the_held_out_images_out(tmp_path, dataset):
    cfg = load(tmp_path, dataset, val_dir=None, val_split=0.25)
    train, val = split.train_and_val(cfg)
    assert len(train) == 72 and len(val) == 24   # 4 classes x 24: 6 of each held out
    step = folders.step_files(cfg, epoch=0, cursor=0)
    assert len(step) == 16 and set(step) <= set(train.paths) and not set(step) & set(val.paths)
    no_split = load(tmp_path, dataset, val_dir=None)
    assert split.train_and_val(no_split)[1] is None and len(split.training_set(no_split)) == 96


def test_start_counts_the_images_left_for_training(tmp_path, dataset):
    """`trainctl start` checks the effective batch against the training part, not all of train_dir."""
    from trainctl.supervisor.launch import check_data
    check_data(load(tmp_path, dataset, val_dir=None, val_split=0.25))   # 72 images left, batch 16
    path = tmp_path / "big.toml"
    path.write_text(config_text("split", dataset, data={"val_dir": None, "val_split": 0.25},
                                train={"effective_batch_size": 80}, profiles=[{"device": "cpu", "batch_size": 8}]))
    with pytest.raises(ConfigError, match=r"has 72 images \(after \[data\] val_split = 0.25 held some out\)"):
        check_data(configlib.load(path))


# ---- the run's identity --------------------------------------------------------------------------------------
def test_the_checkpoint_identity_holds_the_split_and_refuses_another(tmp_path, dataset):
    scanned = folders.scan(dataset[0], EXT)
    train, _ = split.hold_out(scanned, 0.25, seed=7)
    saved = manifest.identity(train, manifest.build(train))
    assert saved["val_split"] == 0.25 and saved["val_held_out"] == 24 and saved["num_samples"] == 72
    assert "val_split" not in manifest.identity(scanned, manifest.build(scanned))   # no split: as before
    manifest.check(saved, manifest.build(train), train, tmp_path)   # the same split: passes
    other, _ = split.hold_out(scanned, 0.5, seed=7)
    with pytest.raises(ConfigError) as caught:
        manifest.check(saved, manifest.build(other), other, tmp_path)
    assert "[data] val_split = 0.25" in str(caught.value) and "0.5" in str(caught.value)
    with pytest.raises(ConfigError, match="val_split = 0, now it is 0.25"):   # a run begun without a split
        manifest.check(manifest.identity(scanned, manifest.build(scanned)), manifest.build(train), train, tmp_path)


def test_a_file_added_to_the_held_out_side_only_is_refused_and_one_added_to_training_is_named(tmp_path):
    """'f' 41 → 42 images holds out 11, not 10: the new file is either held out (training unchanged, the
    validation set not: refused all the same) or trains (the training files' check names it)."""
    base = listing(sizes={**SIZES, "f": 41})
    train, _ = split.hold_out(base, 0.25, seed=7)
    saved = manifest.identity(train, manifest.build(train))
    manifest.keep(tmp_path, manifest.build(train), train.root)
    kinds = set()
    for n in range(12):
        after, _ = split.hold_out(with_file(base, "f", f"new{n}.jpg"), 0.25, seed=7)
        now = manifest.build(after)
        with pytest.raises(CannotContinue) as refused:
            manifest.check(saved, now, after, tmp_path)
        message = str(refused.value)
        assert refused.value.kind == "data_error" and "Fix:" in message
        if now.fingerprint == saved["data_fingerprint"]:
            assert "holds out" in message and "17 images then, 18 now" in message, message
        else:
            assert "1 added" in message, message
        kinds.add(now.fingerprint == saved["data_fingerprint"])
    assert kinds == {True, False}


# ---- a real worker ----------------------------------------------------------------------------------------------
def test_a_worker_validates_on_the_held_out_images_and_refuses_a_resume_with_another_split(tmp_path, dataset):
    run_dir = make_run(tmp_path, "held", config_text("held", dataset, data={"val_dir": None, "val_split": 0.25}))
    result = run_worker(run_dir)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert "validation set: 24 of the 96 images of [data] train_dir held out" in result.stdout
    assert result.stdout.count("validation: top-1") == 3, result.stdout   # one per epoch
    vals = [r for r in map(json.loads, (run_dir / METRICS_FILE).read_text().splitlines()) if r.get("kind") == "val"]
    assert len(vals) == 3 and all(0 <= r["val_acc"] <= 1 for r in vals)
    assert read_heartbeat(run_dir).total_steps == 3 * (72 // 16)   # 72 training images, not 96
    cfg = configlib.load(run_dir / "config.toml")
    train, held = split.train_and_val(cfg)
    trained_on = {row[0] for row in map(json.loads, (run_dir / DATA_MANIFEST_FILE).read_text().splitlines()[1:])}
    assert trained_on == {split.relative(train, p) for p in train.paths}   # what the checkpoints were trained on
    assert not trained_on & {split.relative(held, p) for p in held.paths}

    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_split=0.5))
    fsio.atomic_write(run_dir / "config.toml", configlib.to_toml(other))   # the frozen config edited by hand
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").glob("*")}
    result = run_worker(run_dir, attempt=2)
    assert result.returncode == ExitCode.CONFIG_ERROR, result.stdout + result.stderr
    error = json.loads(error_json_path(run_dir, 2).read_text())
    assert error["kind"] == "config_error" and "Traceback" not in result.stderr
    assert "[data] val_split = 0.25, now it is 0.5" in error["message"] and "Fix:" in error["message"]
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").glob("*")} == before
