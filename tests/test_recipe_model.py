"""The model side of the fine-tuning recipe (issue 18): [model] drop_path_rate and drop_rate, [train] layer_decay
(per-layer LRs that follow the schedule, exactly resumable) and top-5 accuracy beside top-1 past 5 classes."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_weights, config_text, make_run, run_worker, weights
from rich.console import Console

from trainctl.contract import config as configlib
from trainctl.contract import fixed
from trainctl.contract.config import ConfigError
from trainctl.contract.protocol import WORKER_ENV, ExitCode
from trainctl.contract.runfolder import METRICS_FILE, REPORT_FILE, REPORT_JSON, newest_checkpoint
from trainctl.supervisor.demo_data import CLASSES, draw
from trainctl.supervisor.foreground import progress_line
from trainctl.supervisor.status import gather
from trainctl.supervisor.view import render_status
from trainctl.worker import checkpoint
from trainctl.worker.model import build_model, build_optimizer, build_scheduler, scheduled_lr
from trainctl.worker.preflight import check_config
from trainctl.worker.validation import hits

RECIPE = {"model": {"drop_path_rate": 0.1, "drop_rate": 0.1}, "train": {"layer_decay": 0.65}}


def load(tmp_path: Path, dataset, **sections) -> configlib.Config:
    path = tmp_path / "recipe.toml"
    path.write_text(config_text("recipe", dataset, **sections))
    return configlib.load(path)


# ---- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("section,key,value,allowed", [
    ("model", "drop_path_rate", 1.0, "at least 0 and below 1"), ("model", "drop_path_rate", -0.1, "at least 0 and below 1"),
    ("model", "drop_rate", 1.5, "at least 0 and below 1"), ("train", "layer_decay", 0, "above 0 and at most 1"),
    ("train", "layer_decay", 1.2, "above 0 and at most 1"), ("train", "layer_decay", "0.65", "must be a number")])
def test_a_value_out_of_range_is_one_line_naming_the_key_and_the_fix(tmp_path, dataset, section, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, dataset, **{section: {key: value}})
    message = str(err.value)
    assert f"[{section}] {key}" in message or f"[{section}].{key}" in message, message
    assert allowed in message and "\n" not in message


def test_defaults_are_off_and_the_frozen_copy_keeps_set_values(tmp_path, dataset):
    plain = load(tmp_path, dataset)
    assert (plain.model.drop_path_rate, plain.model.drop_rate, plain.train.layer_decay) == (0.0, 0.0, None)
    recipe = load(tmp_path, dataset, **RECIPE)
    frozen = tmp_path / "frozen.toml"
    frozen.write_text(configlib.to_toml(recipe))
    again = configlib.load(frozen)
    assert (again.model.drop_path_rate, again.model.drop_rate, again.train.layer_decay) == (0.1, 0.1, 0.65)
    assert configlib.load(tmp_path / "recipe.toml") == recipe and again.model == recipe.model


def test_the_settings_are_fixed_on_resume_and_part_of_the_identity_only_when_on(tmp_path, dataset):
    plain, recipe = load(tmp_path, dataset), load(tmp_path, dataset, **RECIPE)
    # Off: the identity of a checkpoint written before these keys existed, so such a checkpoint still resumes.
    assert not {"drop_path_rate", "drop_rate", "layer_decay"} & fixed.identity(plain).keys()
    assert {k: fixed.identity(recipe)[k] for k in ("drop_path_rate", "drop_rate", "layer_decay")} == \
        {"drop_path_rate": 0.1, "drop_rate": 0.1, "layer_decay": 0.65}
    assert fixed.resume_changes(recipe, plain) == ["[model] drop_path_rate: 0.1 → 0.0", "[model] drop_rate: 0.1 → 0.0",
                                                       "[train] layer_decay: 0.65 → None"]
    other = load(tmp_path, dataset, train={"layer_decay": 0.75})
    assert fixed.resume_changes(other, plain) == ["[train] layer_decay: 0.75 → None"]


# ---- the model ---------------------------------------------------------------------------------------------------
def test_drop_rates_reach_timm_and_a_model_without_them_is_a_config_error(tmp_path, dataset):
    model = build_model(load(tmp_path, dataset, **RECIPE), 4)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1) and model.head_drop.p == pytest.approx(0.1)
    plain = build_model(load(tmp_path, dataset), 4)
    assert isinstance(plain.blocks[-1].drop_path1, torch.nn.Identity) and plain.head_drop.p == 0
    cfg = load(tmp_path, dataset, model={"name": "inception_v3", "drop_path_rate": 0.1})
    with torch.device("meta"), pytest.raises(ConfigError) as err:   # meta: nothing allocated
        build_model(cfg, 4)
    assert "[model] drop_path_rate = 0.1: 'inception_v3' does not take it" in str(err.value)
    assert "Fix: remove drop_path_rate" in str(err.value)


def test_layer_groups_get_lrs_that_follow_the_schedule(tmp_path, dataset):
    """Each group's LR is the scheduled LR (the one a run without layer decay gets) x its lr_scale, at every step of
    the warmup and the cosine decay; the reported LR is the scheduled one."""
    cfg = load(tmp_path, dataset, train={"layer_decay": 0.65, "warmup_epochs": 1, "min_lr": 1e-5})
    plain_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, layer_decay=None))
    model = build_model(cfg, 4)
    decayed, plain = build_optimizer(cfg, model), build_optimizer(plain_cfg, model)
    total, warmup = 30, 6
    schedules = [build_scheduler(c, o, total, warmup) for c, o in ((cfg, decayed), (plain_cfg, plain))]
    scales = sorted({g["lr_scale"] for g in decayed.param_groups})
    assert len(scales) >= 4 and scales[-1] == 1.0 and scales[-2] == pytest.approx(0.65)
    seen = []
    for t in range(total + 1):
        for s in schedules:
            s.step_update(num_updates=t)
        want = plain.param_groups[0]["lr"]
        assert {g["lr"] for g in plain.param_groups} == {want}
        for g in decayed.param_groups:
            assert g["lr"] == pytest.approx(want * g["lr_scale"], rel=1e-12), (t, g["lr_scale"])
        assert scheduled_lr(decayed) == pytest.approx(want, rel=1e-12) and scheduled_lr(plain) == want
        seen.append(want)
    assert seen[0] < seen[warmup] and seen[warmup] > seen[-1] >= 1e-5   # warmed up, then decayed


def test_the_preflight_of_start_accepts_the_recipe(tmp_path, dataset, monkeypatch, capsys):
    """`trainctl start` checks the optimizer and schedule on a one-layer stand-in model: layer_decay must pass it."""
    for key, value in WORKER_ENV.items():   # check_config sets them; the test process keeps its own
        monkeypatch.setenv(key, value)
    path = tmp_path / "recipe.toml"
    path.write_text(config_text("recipe", dataset, **RECIPE))
    assert check_config(path) == ExitCode.OK, capsys.readouterr()


def test_hits_counts_valid_samples_whose_label_is_in_the_top_k():
    logits = torch.tensor([[9., 1, 2, 3, 4, 5, 6],     # label 0: top-1
                           [1., 9, 8, 7, 6, 5, 4],     # label 6: 6th highest, not in the top 5
                           [1., 2, 3, 4, 5, 6, 9],     # label 2: 5th highest
                           [9., 8, 7, 6, 5, 4, 3]])    # label 0, but not a valid sample
    labels = torch.tensor([0, 6, 2, 0])
    valid = torch.tensor([True, True, True, False])
    assert hits(logits, labels, valid, 1) == 1 and hits(logits, labels, valid, 5) == 2


# ---- real runs -------------------------------------------------------------------------------------------------------
def val_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [r for r in lines if r["kind"] == "val"]


def test_a_run_with_the_recipe_killed_and_resumed_ends_bit_identical(tmp_path, dataset):
    """Layer decay, drop path and dropout on: SIGKILLed at step 10, resumed from the step-9 checkpoint (which holds
    the layer groups and their scales), the weights equal an uninterrupted run's. A resume with another layer_decay is
    refused. 4 classes: no top-5 is measured."""
    synchronous = {"every_steps": 3, "async_write": False}    # checkpoints at steps 3, 6, 9 exactly
    whole = make_run(tmp_path, "whole", config_text("whole", dataset, checkpoint=synchronous, **RECIPE))
    result = run_worker(whole)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr

    killed = make_run(tmp_path, "killed", config_text("killed", dataset, checkpoint=synchronous, **RECIPE))
    assert run_worker(killed, faults="train_step:sigkill@10").returncode == -signal.SIGKILL
    newest = newest_checkpoint(killed)
    assert newest.step == 9
    state, _, _ = checkpoint.load_latest(killed / "checkpoints", checkpoint.Verified())
    groups = state["optimizer"]["param_groups"]
    assert len({g["lr_scale"] for g in groups}) >= 4 and all(g["lr"] == pytest.approx(
        max(h["lr"] for h in groups) * g["lr_scale"], rel=1e-12) for g in groups)
    changed = Path(shutil.copytree(killed, tmp_path / "changed"))
    resumed = run_worker(killed, attempt=2)
    assert resumed.returncode == ExitCode.OK, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    assert_same_weights(whole, killed)

    config = changed / "config.toml"
    config.write_text(config.read_text().replace("layer_decay = 0.65", "layer_decay = 0.75"))
    refused = run_worker(changed, attempt=2)
    assert refused.returncode == ExitCode.CONFIG_ERROR, refused.stdout + refused.stderr
    assert "layer_decay: checkpoint 0.65 vs now 0.75" in refused.stdout + refused.stderr

    assert [r["epoch"] for r in val_lines(whole)] == [1, 2, 3]
    assert all("val_top5" not in r for r in val_lines(whole))   # 4 classes: absent, not 100%


@pytest.fixture(scope="module")
def six_classes(tmp_path_factory) -> tuple[Path, Path]:
    """6 classes (the 4 shapes, and two of them again under other names) x 16 training and 4 validation images."""
    root = tmp_path_factory.mktemp("six")
    rng = np.random.default_rng(3)
    for split, count in (("train", 16), ("val", 4)):
        for c in range(6):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                draw(CLASSES[c % 4], 40, rng).save(folder / f"{i:03d}.jpg", quality=90)
    return root / "train", root / "val"


def test_top5_beside_top1_in_metrics_status_and_report_past_5_classes(tmp_path, six_classes):
    """A real run under the real supervisor on 6 classes: each epoch's validation line holds top-5 (at least top-1,
    at most 1), and `trainctl status` and the morning report show it."""
    run_dir = make_run(tmp_path, "six", config_text("six", six_classes, train={"epochs": 2}))
    result = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                            env={**os.environ, "TRAINCTL_FAULTS": ""}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = val_lines(run_dir)
    assert [r["epoch"] for r in lines] == [1, 2]
    assert all(0 <= r["val_acc"] <= r["val_top5"] <= 1 for r in lines)
    # 24 validation images: each accuracy is a count of them
    assert all(round(r["val_top5"] * 24, 9).is_integer() for r in lines)
    top5 = lines[-1]["val_top5"]

    st = gather(run_dir)
    assert st.metrics["val_top5"] == [r["val_top5"] for r in lines]
    assert st.val_top5 == top5 and st.to_json()["val_top5"] == top5   # trainctl status --json
    assert f"validation: top-1 {lines[-1]['val_acc']:.3f}, top-5 {top5:.3f}" in progress_line(lines[-1], None, None)
    console = Console(file=io.StringIO(), width=200)
    console.print(render_status(st))
    assert f"val top-5  {top5:.3f}" in console.file.getvalue()
    report = (run_dir / REPORT_FILE).read_text()
    assert f"- final validation accuracy: {lines[-1]['val_acc']:.1%} (top-5: {top5:.1%})" in report
    assert json.loads((run_dir / REPORT_JSON).read_text())["val_top5"] == top5


# The issue's EVA02 recipe, all at once, on the tests' tiny model: timm train.py's --layer-decay 0.65 --drop-path 0.1
# --model-ema --aa rand-m9-mstd0.5-inc1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --smoothing 0.1, and a held-out split.
WHOLE_RECIPE = {
    "model": {"drop_path_rate": 0.1, "drop_rate": 0.1},
    "train": {"layer_decay": 0.65, "label_smoothing": 0.1},
    "ema": {"enabled": True, "decay": 0.99, "warmup": True, "device": "cpu"},
    "augment": {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "mixup_alpha": 0.8, "cutmix_alpha": 1.0},
    "data": {"val_dir": None, "val_split": 0.25},
}


def test_the_whole_recipe_killed_again_and_again_with_and_without_loader_processes_ends_bit_identical(tmp_path,
                                                                                                     dataset):
    """Every part of the recipe on at once: SIGKILLed mid-step twice, the attempts alternating 2 loader processes and
    none; the model and its EMA end bit-identical to an uninterrupted in-process run's."""
    whole = make_run(tmp_path, "whole", config_text("whole", dataset, **WHOLE_RECIPE))
    result = run_worker(whole)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert "training on the other 72" in result.stdout, result.stdout   # val_split held 24 of 96 out

    killed = make_run(tmp_path, "killed", config_text("killed", dataset, **WHOLE_RECIPE))
    frozen = killed / "config.toml"
    kills = 0
    for attempt in range(1, 6):
        workers = 2 if attempt % 2 else 0
        frozen.write_text(re.sub(r"num_workers = \d+", f"num_workers = {workers}", frozen.read_text(), count=1))
        result = run_worker(killed, attempt=attempt, faults="train_step:sigkill@5:once,train_step:sigkill@9:once")
        if result.returncode == ExitCode.OK:
            break
        assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
        kills += 1
    assert kills == 2 and result.returncode == ExitCode.OK
    assert_same_weights(whole, killed)
    ema_whole, ema_killed = weights(whole / "model_ema.safetensors"), weights(killed / "model_ema.safetensors")
    assert all(torch.equal(ema_whole[k], ema_killed[k]) for k in ema_whole)
    assert [r["epoch"] for r in val_lines(killed)][-1] == 3 and "ema_val_acc" in val_lines(killed)[-1]
