"""Config loading: defaults, paths, the frozen copy, the default ladder, and every bad value's message."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from trainctl.contract import config as c
from trainctl.contract import config_rules, fixed
from trainctl.supervisor.demo_data import small_config

# The tests' config: the demo's small run with a two-rung ladder, relative data and runs paths, and
# run.runs_dir, run.seed and model.img_size left out so that their defaults apply.
LADDER = [{"device": "cpu", "batch_size": 8}, {"device": "cpu", "batch_size": 4}]
LEFT_OUT = {"run": {"runs_dir": None, "seed": None}, "model": {"img_size": None}}


def good(**sections) -> str:
    """GOOD with each keyword's section keys replaced (None removes a key); `profiles=[...]` replaces the ladder."""
    merged = {name: {**LEFT_OUT.get(name, {}), **sections.get(name, {})}
              for name in (LEFT_OUT.keys() | sections.keys()) - {"profiles"}}
    return small_config("digits", "data/train", profiles=sections.get("profiles", LADDER), **merged)


GOOD = good()


def load_text(tmp_path: Path, text: str) -> c.Config:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return c.load(path)


def test_defaults_and_relative_paths(tmp_path):
    cfg = load_text(tmp_path, GOOD)
    assert cfg.run.runs_dir == tmp_path / "runs"
    assert cfg.run_dir == tmp_path / "runs" / "digits"
    assert cfg.data.train_dir == tmp_path / "data" / "train"
    assert cfg.data.val_dir is None and cfg.model.img_size is None
    assert cfg.run.seed == 42 and cfg.checkpoint.keep_last == 3 and cfg.train.opt == "adamw"
    assert [p.batch_size for p in cfg.profiles] == [8, 4]
    assert [cfg.grad_accum(i) for i in range(2)] == [2, 4]


def test_frozen_copy_round_trips(tmp_path):
    cfg = load_text(tmp_path, good(model={"img_size": 64, "weights": ""}))
    frozen = tmp_path / "elsewhere" / "config.toml"
    frozen.parent.mkdir()
    frozen.write_text(c.to_toml(cfg))
    again = c.load(frozen)
    assert dataclasses.replace(again, source=None) == dataclasses.replace(cfg, source=None)


@pytest.mark.parametrize("accelerator,effective,expected", [
    ("mps", 64, [("mps", 2), ("mps", 1), ("cpu", 1)]),
    ("mps", 3, [("mps", 1), ("cpu", 1)]),
    ("cuda", 64, [("cuda", 32), ("cuda", 16), ("cuda", 8), ("cpu", 4)]),
    ("cuda", 6, [("cuda", 6), ("cuda", 3), ("cuda", 1), ("cpu", 3)]),
    (None, 64, [("cpu", 8)]),
    (None, 6, [("cpu", 6)]),
])
def test_default_ladder(accelerator, effective, expected):
    ladder = c.default_ladder(accelerator, effective)
    assert [(p.device, p.batch_size) for p in ladder] == expected
    assert all(effective % p.batch_size == 0 for p in ladder)


def test_missing_profiles_use_the_default_ladder(tmp_path):
    cfg = load_text(tmp_path, good(profiles=[]))
    assert cfg.profiles == c.default_ladder(c.detect_accelerator(), 16)


@pytest.mark.parametrize("text,total,expected", [
    ("85%", 1000, 850), ("12GB", 0, 12 << 30), ("512 MiB", 0, 512 << 20), ("1000B", 0, 1000), ("", 5, None),
    ("1.5g", 0, int(1.5 * 2**30)),
])
def test_memory_limits(text, total, expected):
    assert c.parse_memory_limit(text, total) == expected


# (what to change in GOOD, words the one-line error must contain)
BAD = [
    (("[run]\n", "[runn]\n"), ["unknown key runn", "Did you mean 'run'"]),
    (('name = "digits"', 'nmae = "digits"'), ["[run].nmae", "Did you mean 'name'"]),
    (('name = "digits"', 'name = 5'), ["[run].name", "must be a string"]),
    (('name = "digits"', 'name = "a/b"'), ["[run] name", "folder name"]),
    (("epochs = 3", "epochs = 0"), ["[train] epochs", "out of range", "between 1 and 1000000"]),
    (("epochs = 3", 'epochs = "3"'), ["[train].epochs", "whole number"]),
    (("epochs = 3", "epochs = 3.5"), ["[train].epochs", "whole number"]),
    (("lr = 0.001", "lr = -1"), ["[train] lr", "above 0"]),
    (("lr = 0.001", "lr = 0"), ["[train] lr", "above 0"]),
    (("lr = 0.001", "lr = true"), ["[train].lr", "number"]),
    (("effective_batch_size = 16", "effective_batch_size = 10"), ["batch_size", "does not divide", "[1, 2, 5, 10]"]),
    (('device = "cpu"\nbatch_size = 8', 'device = "gpu"\nbatch_size = 8'), ["device", "cpu, cuda, mps, auto"]),
    (("batch_size = 4", "batch_size = 0"), ["[[profiles]] #2 batch_size", "between 1 and"]),
    (("batch_size = 4", "batch_size = 4\nprecision = \"fp8\""), ["precision", "fp32, bf16, fp16"]),
    (("batch_size = 4", "batch_size = 4\nnum_workers = -1"), ["[[profiles]] #2 num_workers", "between 0 and 1024"]),
    (("lr = 0.001", "lr = 0.001\nwarmup_epochs = 3"), ["warmup_epochs", "not below epochs"]),
    (("lr = 0.001", "lr = 0.001\nlabel_smoothing = 1.5"), ["label_smoothing"]),
    (("crop_scale = [0.5, 1.0]", "crop_scale = [0.5]"), ["crop_scale", "list of 2"]),
    (("crop_scale = [0.5, 1.0]", "crop_scale = [0.9, 0.1]"), ["crop_scale", "range"]),
    (('train_dir = "data/train"', 'train_dir = "data/train"\nhflip = 2'), ["hflip", "between 0 and 1"]),
    (('train_dir = "data/train"', ''), ["missing required key [data].train_dir"]),
    (("[train]\n", "[training]\n"), ["unknown key training", "Did you mean 'train'"]),
    (('[model]\nname = "test_vit"', '[model]\nname = "test_vit"\nweights = "nope.pt"'),
     ["[model] weights", "not a file"]),
    (('[model]\nname = "test_vit"', '[model]\nname = "test_vit"\nimg_size = 2'),
     ["[model] img_size", "between 8 and 4096"]),
    (("[checkpoint]\n", "[checkpoint]\nkeep_last = 0\n"), ["[checkpoint] keep_last", "between 1 and"]),
    (("[checkpoint]\n", "[checkpoint]\nevery_steps = -5\n"), ["[checkpoint] every_steps", "between 0 and"]),
    (("[supervisor]\n", "[supervisor]\nmemory_soft_limit = \"lots\"\n"), ["memory_soft_limit", "12GB"]),
    (("[supervisor]\n", "[supervisor]\nbackoff_seconds = []\n"), ["backoff_seconds", "non-empty"]),
    (("[supervisor]\n", "[supervisor]\nhang_timeout_seconds = 0\n"), ["hang_timeout_seconds", "seconds between 1 and"]),
    (("[supervisor]\n", "[supervisor]\nmax_restart_per_profile = 2\n"),
     ["max_restart_per_profile", "Did you mean 'max_restarts_per_profile'"]),
    (("[supervisor]\n", "[supervisor]\nmemory_hard_limit = \"150%\"\n"), ["memory_hard_limit", "between 0% and 100%"]),
    # A bare number is not 85 bytes (every attempt stopped at boot): it needs a unit or a '%'.
    (("[supervisor]\n", "[supervisor]\nmemory_soft_limit = \"85\"\n"),
     ["[supervisor] memory_soft_limit", "'85'", "bare number", "\"85%\""]),
    (("[supervisor]\n", "[supervisor]\nmemory_hard_limit = \"600MB\"\n"),
     ["[supervisor] memory_hard_limit", "below the 1 GiB a worker needs to boot"]),
    (("[train]\nepochs = 3", "[train]\nepochs = 3\nepochs = 4"), ["not valid TOML"]),
]


@pytest.mark.parametrize("change,words", BAD, ids=[f"bad{i:02d}" for i in range(len(BAD))])
def test_bad_config_gives_one_clear_error(tmp_path, change, words):
    old, new = change
    assert old in GOOD
    with pytest.raises(c.ConfigError) as err:
        load_text(tmp_path, GOOD.replace(old, new, 1))
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


def test_missing_and_unreadable_config_files(tmp_path):
    with pytest.raises(c.ConfigError, match="does not exist"):
        c.load(tmp_path / "nope.toml")
    with pytest.raises(c.ConfigError, match="missing section \\[train\\]"):
        load_text(tmp_path, GOOD.split("[train]")[0])


def test_profiles_must_be_tables(tmp_path):
    with pytest.raises(c.ConfigError, match="array of tables"):
        load_text(tmp_path, "profiles = 3\n" + GOOD.split("[[profiles]]")[0])


@pytest.mark.parametrize("share,words", [("85%", None), ("10%", "0.80 GiB of this machine's 8.0 GiB")])
def test_a_share_of_ram_below_what_a_worker_needs_is_refused(tmp_path, monkeypatch, share, words):
    monkeypatch.setattr(config_rules, "machine_memory", lambda: 8 << 30)
    text = GOOD.replace("[supervisor]\n", f'[supervisor]\nmemory_soft_limit = "{share}"\n', 1)
    if words is None:
        assert load_text(tmp_path, text).supervisor.memory_soft_limit == share
        return
    with pytest.raises(c.ConfigError) as err:
        load_text(tmp_path, text)
    assert "[supervisor] memory_soft_limit" in str(err.value) and words in str(err.value)


def test_resume_changes_name_each_setting_the_checkpoints_fix(tmp_path):
    frozen = load_text(tmp_path, GOOD)
    allowed = load_text(tmp_path, good(checkpoint={"keep_last": 5}, supervisor={"hang_timeout_seconds": 99},
                                       train={"log_every_steps": 1}, profiles=[{"device": "cpu", "batch_size": 2}]))
    assert fixed.resume_changes(frozen, allowed) == []
    changed = load_text(tmp_path, good(train={"epochs": 2, "lr": 0.01, "warmup_lr": 0.5}, run={"seed": 3}))
    assert fixed.resume_changes(frozen, changed) == ["[run] seed: 42 → 3", "[train] epochs: 3 → 2",
                                                 "[train] lr: 0.001 → 0.01", "[train] warmup_lr: 1e-05 → 0.5"]
