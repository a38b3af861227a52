"""Micro-batches: the same pixels whatever the batch size, the loader processes or the resume point."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import config_text, make_run, run_worker

from trainctl.contract.config import ConfigError
from trainctl.contract.folders import epoch_order, scan
from trainctl.contract.protocol import ExitCode
from trainctl.worker import data
from trainctl.worker.images import Recipe

EXT = (".jpg", ".png")
RECIPE = Recipe(size=32, crop_scale=(0.5, 1.0))


def test_scan_is_sorted_and_labelled(dataset):
    folder = scan(dataset[0], EXT)
    assert folder.classes == ("circle", "square", "stripes", "triangle")
    assert list(folder.paths) == sorted(folder.paths) and len(folder) == 96
    assert all(folder.classes[label] in path for path, label in zip(folder.paths, folder.labels))


def test_scan_errors(tmp_path, dataset):
    with pytest.raises(ConfigError, match="does not exist"):
        scan(tmp_path / "nope", EXT)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no class folders"):
        scan(tmp_path / "flat", EXT)
    shutil.copytree(dataset[0], tmp_path / "train")
    (tmp_path / "train" / "empty_class").mkdir()
    with pytest.raises(ConfigError, match="empty_class has no images"):
        scan(tmp_path / "train", EXT)
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    (tmp_path / "val" / "zebra" / "z.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="zebra"):
        scan(tmp_path / "val", EXT, "[data] val_dir", ("circle",))


def one_class(tmp_path, dataset):
    """A training folder with a single class folder (of real images) in it."""
    root = tmp_path / "train"
    shutil.copytree(dataset[0] / "circle", root / "circle")
    return root


def test_a_single_class_training_folder_is_refused_naming_the_folder_and_the_class(tmp_path, dataset):
    root = one_class(tmp_path, dataset)
    with pytest.raises(ConfigError) as caught:
        scan(root, EXT)
    message = str(caught.value)
    assert message.startswith(f"[data] train_dir {root} has one class folder ('circle')"), message
    assert "classification needs at least two" in message and "Fix:" in message and "\n" not in message


def test_a_validation_folder_may_hold_a_subset_of_the_classes_even_one(tmp_path, dataset):
    root = one_class(tmp_path, dataset)
    folder = scan(root, EXT, "[data] val_dir", ("circle", "square"))
    assert folder.classes == ("circle", "square") and set(folder.labels) == {0} and len(folder) == 24


def test_start_refuses_a_single_class_dataset_before_making_a_run_folder(tmp_path, dataset):
    """The CLI's early data check (`trainctl start`): one clear line, exit 3, nothing written."""
    root = one_class(tmp_path, dataset)
    (tmp_path / "one.toml").write_text(config_text("one", (root, dataset[1])))
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "COLUMNS": "120", "TRAINCTL_FAULTS": ""}
    result = subprocess.run([sys.executable, "-c", "from trainctl.supervisor.cli import main; raise SystemExit(main())",
                             "start", "--config", "one.toml"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == ExitCode.BAD_CONFIG, result.stdout + result.stderr
    said = " ".join(result.stderr.split())   # the message may be wrapped to the terminal's width
    assert f"{root} has one class folder ('circle')" in said and "Fix:" in said and "Traceback" not in said, said
    assert not (tmp_path / "runs" / "one").exists()


def test_the_worker_refuses_a_single_class_dataset(tmp_path, dataset):
    """A run folder made before the data lost its other classes: the worker stops with a config error, no model."""
    root = one_class(tmp_path, dataset)
    run_dir = make_run(tmp_path, "one", config_text("one", (root, None)))
    result = run_worker(run_dir)
    assert result.returncode == ExitCode.CONFIG_ERROR, result.stdout + result.stderr
    assert f"{root} has one class folder ('circle')" in result.stdout + result.stderr
    assert not (run_dir / "model.safetensors").exists() and not list((run_dir / "checkpoints").glob("*"))


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert np.array_equal(epoch_order(3, 1, 50), epoch_order(3, 1, 50))
    assert not np.array_equal(epoch_order(3, 1, 50), epoch_order(3, 2, 50))
    assert sorted(epoch_order(3, 1, 50)) == list(range(50))


def test_micro_batches_do_not_depend_on_batch_size(dataset):
    folder = scan(dataset[0], EXT)
    big = data.MicroBatches(folder, RECIPE, 7, 8, train=True)[(1, 16)]
    small = data.MicroBatches(folder, RECIPE, 7, 4, train=True)
    halves = [small[(1, 16)], small[(1, 20)]]
    assert torch.equal(big.images, torch.cat([h.images for h in halves]))
    assert torch.equal(big.labels, torch.cat([h.labels for h in halves]))
    assert big.valid.all()


def test_loader_processes_give_the_same_batches(dataset):
    folder = scan(dataset[0], EXT)
    ds = data.MicroBatches(folder, RECIPE, 7, 8, train=True)
    keys = data.train_keys(0, 32, 2, 6, 16, 8)
    here = list(data.iterate(ds, keys, 0, 7, spawn=False))
    there = list(data.iterate(ds, keys, 2, 7, spawn=False))
    assert len(here) == len(there) == (96 - 32) // 8 + 96 // 8
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(here, there))


def test_bad_images_become_the_dummy_and_are_reported(tmp_path, dataset):
    root = tmp_path / "train"
    shutil.copytree(dataset[0], root)
    (root / "circle" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    folder = scan(root, EXT)
    ds = data.MicroBatches(folder, RECIPE, 7, 4, train=False)
    i = folder.paths.index(str(root / "circle" / "zz-broken.jpg"))
    mb = ds[(0, i - i % 4)]
    slot = i % 4
    assert not mb.valid[slot] and mb.valid.sum() == 3
    assert torch.equal(mb.images[slot], ds.dummy)
    assert mb.bad == [(str(root / "circle" / "zz-broken.jpg"), mb.bad[0][1])] and mb.bad[0][1]


def test_eval_tail_is_padded_not_dropped(dataset):
    folder = scan(dataset[1], EXT)   # 24 validation images
    ds = data.MicroBatches(folder, RECIPE, 7, 5, train=False)
    batches = [ds[k] for k in data.eval_keys(len(folder), 5)()]
    assert sum(int(b.valid.sum()) for b in batches) == 24
    assert all(b.images.shape == (5, 3, 32, 32) for b in batches)   # fixed shapes (MPS graph cache)
