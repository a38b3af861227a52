"""[augment] (issue 18): timm's RandAugment / AutoAugment / AugMix, colour jitter and random erasing on the fast data
path, every draw a function of (seed, epoch, sample index): bit-identical twice, in loader processes, and after a
SIGKILL and resume; with [augment] off the decoded bytes are exactly those of the code before [augment] existed."""
from __future__ import annotations

import dataclasses
import hashlib
import pickle
import random
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_weights, config_text, make_run, photo, run_worker
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment

from trainctl.contract import config as configlib
from trainctl.contract import fixed
from trainctl.contract import manifest
from trainctl.contract.config import AugmentSection, ConfigError
from trainctl.contract.folders import scan
from trainctl.contract.protocol import ExitCode
from trainctl.worker import augment, checkpoint, data, images
from trainctl.worker.images import Recipe
from trainctl.worker.snapshot import check_identity

EXT = (".jpg", ".png")
TRAIN = Recipe(size=32, crop_scale=(0.5, 1.0), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


# ---- augment off = the bytes of the code before [augment] ---------------------------------------------------------
def digest_folder(root: Path) -> Path:
    """Photos that take every decode path: reduced DCT scale and a cut decode (big, wide), EXIF orientation, a
    progressive JPEG (never cut), PNGs in colour and grey."""
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {"a/big.jpg": (photo(640, 480, 1), {"quality": 90}),
             "a/rotated.jpg": (photo(300, 500, 2), {"quality": 92, "exif": exif}),
             "a/progressive.jpg": (photo(400, 300, 3), {"quality": 85, "progressive": True}),
             "b/small.png": (photo(96, 64, 4), {}),
             "b/gray.png": (photo(120, 90, 5).convert("L"), {}),
             "b/wide.jpg": (photo(900, 200, 6), {"quality": 88})}
    for name, (img, options) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / name, **options)
    return root


def decoded_digest(root: Path, interpolation: str, **augment) -> str:
    """sha256 of the training micro-batches (images, labels, validity) of epochs 0-2 of the digest folder."""
    folder = scan(root, (".jpg", ".png"))
    batches = data.MicroBatches(folder, Recipe(size=40, interpolation=interpolation), 7, 3, True, **augment)
    h = hashlib.sha256()
    for epoch in range(3):
        for start in (0, 3):
            mb = batches[(epoch, start)]
            for t in (mb.images, mb.labels, mb.valid):
                h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# Obtained by running decoded_digest over digest_folder with the code at commit 44725da (before [augment] existed:
# `git archive 44725da` into a folder, imported through PYTHONPATH), on x86-64 (torch CPU capability AVX512), Pillow
# 13.0.0, torch 2.14.1. A new Pillow (its JPEG codec) or torch (its resampling kernel) may change them: then take them
# again the same way, from the code as it was before the upgrade.
HEAD_DIGESTS = {"bicubic": "6d0df86f825c651c9fa53da2876847eac98047ddc64f821dd9d9779147fc09f8",    # torch's resampling
                "lanczos": "3e6a6de6a689408d4194150346867a8e151c6ddb8727d326391020eb2aa3e80e"}    # Pillow's


@pytest.mark.parametrize("interpolation", sorted(HEAD_DIGESTS))
def test_with_augment_off_a_sample_decodes_to_the_bytes_of_the_code_before_augment(tmp_path, interpolation):
    """The crop and flip draws are untouched by [augment]: off (absent, or all zero), the training micro-batches are
    byte for byte what the code before it decoded."""
    if interpolation == "bicubic" and "bicubic" not in images._TORCH_FILTERS:
        pytest.skip("the digest was taken where torch resamples bicubic (x86 AVX); here Pillow does")
    root = digest_folder(tmp_path)
    assert decoded_digest(root, interpolation) == HEAD_DIGESTS[interpolation]
    assert decoded_digest(root, interpolation, augment=AugmentSection()) == HEAD_DIGESTS[interpolation]


# ---- config ----------------------------------------------------------------------------------------------------------
RECIPE = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "color_jitter": 0.4}   # timm train.py's EVA02 flags


def augment_text(name: str, dataset, augment: dict, **sections) -> str:
    """The tests' config with an [augment] table."""
    return config_text(name, dataset, augment=augment, **sections)


def load(tmp_path: Path, dataset, **augment) -> configlib.Config:
    path = tmp_path / "augment.toml"
    path.write_text(augment_text("augment", dataset, augment))
    return configlib.load(path)


@pytest.mark.parametrize("key,value,expected", [
    ("auto_augment", "randaug-m9", "does not start with a policy timm knows"),
    ("auto_augment", "rand-m9-mstd", "section 'mstd' without a value"),
    ("auto_augment", "rand-m9-w0", "section 'w0' that 'rand' does not take"),
    ("auto_augment", "augmix-m2.5", "'2.5' is not a whole number"),
    ("auto_augment", "rand-m9-tfoo", "transform set 'foo'"),
    ("re_mode", "zero", "is not a random-erasing mode"),
    ("re_prob", 1.5, "between 0 and 1"), ("re_prob", -0.1, "between 0 and 1"),
    ("color_jitter", -0.4, "between 0 and 1"), ("re_count", 0, "between 1 and 100"),
    ("auto_augment", 9, "must be a string")])
def test_a_bad_value_is_one_line_naming_the_key_and_the_fix(tmp_path, dataset, key, value, expected):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, dataset, **{key: value})
    message = str(err.value)
    assert f"[augment] {key}" in message or f"[augment].{key}" in message, message
    assert expected in message and "\n" not in message
    assert "Fix" in message or "must be" in message


def test_timms_own_parser_refuses_what_it_cannot_build_as_a_config_error():
    """The worker builds the transforms with timm's parser: what it refuses is a ConfigError naming the key too."""
    with pytest.raises(ConfigError, match=r"\[augment\] auto_augment = 'randx' is not understood by timm.*Fix: "):
        augment.build(AugmentSection(auto_augment="randx"), Recipe(size=32))   # past the config rules: built directly


def test_start_s_preflight_builds_the_transforms_with_timm(tmp_path, dataset, monkeypatch, capsys):
    """`trainctl start` runs the worker's preflight: timm's own parser reads [augment] before a run folder exists."""
    from trainctl.worker.preflight import check_config
    path = tmp_path / "run.toml"
    path.write_text(config_text("aug", dataset, augment={"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}))
    assert check_config(path) == ExitCode.OK
    seen = []

    def refused(section, recipe):   # what timm's parser refusing the string looks like
        seen.append(section)
        raise ConfigError("[augment] auto_augment = 'x' is not understood by timm")
    monkeypatch.setattr(augment, "build", refused)
    assert check_config(path) == ExitCode.CONFIG_ERROR and seen[0].auto_augment == "rand-m9-mstd0.5-inc1"
    assert "config_error: [augment] auto_augment" in capsys.readouterr().err


def test_defaults_are_off_and_the_settings_are_part_of_the_identity_only_when_on(tmp_path, dataset):
    plain, recipe = load(tmp_path, dataset), load(tmp_path, dataset, **RECIPE)
    assert plain.augment == AugmentSection() and not augment.is_on(plain.augment)
    keys = {"auto_augment", "color_jitter", "re_prob", "re_mode", "re_count"}
    assert not keys & fixed.identity(plain).keys()   # a checkpoint from before [augment] still resumes
    assert {k: fixed.identity(recipe)[k] for k in keys} == {**RECIPE, "re_mode": "pixel", "re_count": 1}
    assert fixed.resume_changes(recipe, plain) == [
        "[augment] auto_augment: 'rand-m9-mstd0.5-inc1' → ''", "[augment] color_jitter: 0.4 → 0.0",
        "[augment] re_prob: 0.25 → 0.0", "[augment] re_mode: 'pixel' → None", "[augment] re_count: 1 → None"]
    frozen = tmp_path / "frozen.toml"
    frozen.write_text(configlib.to_toml(recipe))
    assert configlib.load(frozen).augment == recipe.augment


def test_with_auto_augment_colour_jitter_is_off_as_in_timm():
    """timm's factory drops colour jitter when auto_augment is on (but for its '3a' policies); so does the recipe."""
    def kinds(**values):
        pil, eraser = augment.build(AugmentSection(**values), Recipe(size=32))
        return [type(t).__name__ for t in pil.transforms] if pil else [], type(eraser).__name__ if eraser else None
    assert kinds(color_jitter=0.4) == (["ColorJitter"], None)
    assert kinds(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, re_prob=0.25) == (["RandAugment"],
                                                                                            "RandomErasing")
    assert kinds(auto_augment="3a", color_jitter=0.4) == (["AutoAugment", "ColorJitter"], None)
    assert kinds(auto_augment="augmix-m3-w3") == (["AugMixAugment"], None)
    assert kinds(re_prob=0.25) == ([], "RandomErasing")


@pytest.mark.parametrize("policy", ["rand-m10-n1-p1.0-mstd0-inc1", "v0"])
def test_posterize_to_zero_bits_gives_a_black_image_not_a_crash(policy):
    """timm asks Pillow to posterize to 0 bits (PosterizeIncreasing at magnitude 10, AutoAugment v0's ('Posterize',
    0.8, 2)); Pillow 13 raises there, so a sample drawing it would crash the run on every retry. The augmenter gives the
    black image Pillow gave before 13; every other op and bit count is timm's and Pillow's own."""
    augmenter = augment.Augmenter(AugmentSection(auto_augment=policy), Recipe(size=32))
    ops = [op for t in augmenter.pil.transforms for op in getattr(t, "ops", []) or sum(getattr(t, "policy", []), [])]
    posterizing = [op for op in ops if op.name.startswith("Posterize")]
    assert posterizing and all(op.aug_fn is augment.posterize for op in posterizing)
    assert not [op for op in ops if op.aug_fn is timm_auto_augment.posterize]
    img = photo(32, 32)
    assert not np.asarray(augment.posterize(img, 0)).any()
    assert augment.posterize(img, 3).tobytes() == ImageOps.posterize(img, 3).tobytes()
    # Both policies draw 0 bits in a few of 300 samples (rand: one op per image at magnitude 10, 1 in 15 posterizes;
    # v0: 1 sub-policy in 25, at p 0.8): without the fix those raise ValueError on Pillow 13.
    crop = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    assert any(not augmenter(crop, 0, 7, 0, i)[0].any() for i in range(300))


# ---- determinism -----------------------------------------------------------------------------------------------------
def section(**values) -> AugmentSection:
    return AugmentSection(**{**RECIPE, **values})


def same(a: data.MicroBatch, b: data.MicroBatch) -> bool:
    """Equal images, labels, validity and erasing patches (place and fill, bit for bit)."""
    patches = [(p.slot, p.top, p.left, p.height, p.width, p.fill.tobytes()) for p in a.erased]
    return (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.valid, b.valid)
            and patches == [(p.slot, p.top, p.left, p.height, p.width, p.fill.tobytes()) for p in b.erased])


def rng_states() -> tuple:
    return random.getstate(), pickle.dumps(np.random.get_state()), torch.get_rng_state()


@pytest.mark.parametrize("recipe", [  # timm's ops draw from Python's `random`, NumPy's and torch's generators
    section(re_prob=0.5),                                                         # RandAugment (random), erasing (torch)
    AugmentSection(color_jitter=0.4, re_prob=0.5, re_mode="rand", re_count=3),   # torchvision's ColorJitter (torch)
    AugmentSection(auto_augment="augmix-m3-w3", re_prob=0.5, re_mode="const")],   # AugMix (NumPy)
    ids=["randaugment", "color_jitter", "augmix"])
def test_a_sample_decodes_bit_identically_twice_and_leaves_the_global_generators_as_they_were(dataset, recipe):
    folder = scan(dataset[0], EXT)
    key = (1, 8)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    before = rng_states()
    first = data.MicroBatches(folder, TRAIN, 7, 8, True, recipe)[key]
    after = rng_states()
    assert after[:2] == before[:2] and torch.equal(after[2], before[2])   # the training process's streams: untouched
    assert same(first, data.MicroBatches(folder, TRAIN, 7, 8, True, recipe)[key])
    assert first.erased and first.valid.all()
    plain = data.MicroBatches(folder, TRAIN, 7, 8, True)[key]
    assert sum(not torch.equal(a, b) for a, b in zip(first.images, plain.images)) >= 4   # the augmentation acted


def test_loader_processes_and_a_pickled_dataset_give_the_same_augmented_batches(dataset):
    """num_workers = 2 (forked loader processes) and a pickled dataset (what a spawned loader process receives)
    decode exactly what the training process does with num_workers = 0."""
    ds = data.MicroBatches(scan(dataset[0], EXT), TRAIN, 7, 8, True, section(re_prob=0.5))
    keys = data.train_keys(0, 32, 2, 6, 16, 8)
    here = list(data.iterate(ds, keys, 0, 7, spawn=False))
    there = list(data.iterate(ds, keys, 2, 7, spawn=False))
    assert len(here) == len(there) == (96 - 32) // 8 + 96 // 8
    assert all(same(a, b) for a, b in zip(here, there))
    assert sum(len(mb.erased) for mb in here) > 10
    copy = pickle.loads(pickle.dumps(ds))
    assert all(same(copy[k], mb) for k, mb in zip(keys(), here[:3]))


def test_other_epochs_and_indices_draw_other_augmentations_and_the_crop_and_flip_stay(dataset):
    folder = scan(dataset[0], EXT)
    plain = data.MicroBatches(folder, TRAIN, 7, 8, True)
    erasing = data.MicroBatches(folder, TRAIN, 7, 8, True, AugmentSection(re_prob=1.0))
    full = data.MicroBatches(folder, TRAIN, 7, 8, True, section())
    for key in ((0, 0), (2, 40)):
        off, erased, on = plain[key], erasing[key], full[key]
        assert torch.equal(off.images, erased.images)   # erasing only: the crop and flip draws are the same as off
        assert sorted({p.slot for p in erased.erased}) == list(range(8))   # re_prob 1: every image erased
        assert sum(not torch.equal(a, b) for a, b in zip(on.images, off.images)) >= 4   # RandAugment changed them
    # One crop, augmented as sample (epoch, index) for 5 epochs x 4 indices: 20 different results, each repeatable.
    augmenter = augment.Augmenter(section(re_prob=1.0), TRAIN)
    crop = plain[(0, 0)].images[0]
    results = {(e, i): augmenter(crop, 0, 7, e, i) for e in range(5) for i in (3, 4, 50, 77)}
    shown = {(pixels.numpy().tobytes(), tuple((p.top, p.left, p.height, p.width) for p in patches))
             for pixels, patches in results.values()}
    assert len(shown) == len(results)
    pixels, patches = augmenter(crop, 0, 7, 2, 50)
    assert torch.equal(pixels, results[2, 50][0]) and [p.fill.tobytes() for p in patches] == \
        [p.fill.tobytes() for p in results[2, 50][1]]


@pytest.mark.parametrize("mode,count", [("pixel", 1), ("rand", 3), ("const", 2)])
def test_erasing_patches_laid_on_the_normalised_batch_are_timms_random_erasing_value_for_value(mode, count):
    """The loader records timm's RandomErasing on a stand-in; laid on the normalised images in the training step
    (augment.erase) they give exactly what timm's transform gives on those images with the same draws."""
    augmenter = augment.Augmenter(AugmentSection(re_prob=0.9, re_mode=mode, re_count=count), TRAIN)
    normalised = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected, patches = normalised.clone(), []
    for slot in range(4):
        with augment.seeded(7, 3, 10 + slot):
            augmenter.eraser(expected[slot])   # timm's transform on the real image
        patches += augmenter(torch.zeros(3, 32, 32, dtype=torch.uint8), slot, 7, 3, 10 + slot)[1]
    assert patches and not torch.equal(expected, normalised)
    assert torch.equal(augment.erase(normalised, patches), expected)


def test_validation_is_never_augmented(dataset):
    folder = scan(dataset[1], EXT)
    plain = data.MicroBatches(folder, TRAIN, 7, 5, False)
    asked = data.MicroBatches(folder, TRAIN, 7, 5, False, section(re_prob=1.0))
    assert asked.augment is None
    for key in data.eval_keys(len(folder), 5)():
        a, b = plain[key], asked[key]
        assert same(a, b) and not b.erased


# ---- real runs -------------------------------------------------------------------------------------------------------
def set_workers(run_dir: Path, workers: int) -> None:
    """The run's ladder with `workers` loader processes (the ladder may change on resume)."""
    config = run_dir / "config.toml"
    text = config.read_text()
    assert text.count("num_workers = ") == 1
    config.write_text(re.sub(r"num_workers = \d+", f"num_workers = {workers}", text))


def test_a_run_with_augmentation_killed_and_resumed_ends_bit_identical(tmp_path, dataset):
    """RandAugment, colour jitter (off beside it, as in timm) and random erasing on: an uninterrupted run in the
    training process (num_workers = 0) equals a run SIGKILLed in the middle of a step with 2 loader processes,
    resumed in the training process, SIGKILLed again between steps and resumed with 2 loader processes. Its
    checkpoints refuse a resume with another [augment]."""
    synchronous = {"every_steps": 3, "async_write": False}   # checkpoints at steps 3, 6, 9, ... exactly
    ladder = [{"device": "cpu", "batch_size": 8, "num_workers": 0}]
    whole = make_run(tmp_path, "whole", augment_text("whole", dataset, RECIPE, checkpoint=synchronous, profiles=ladder))
    result = run_worker(whole)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr

    killed = make_run(tmp_path, "killed", augment_text("killed", dataset, RECIPE, checkpoint=synchronous,
                                                       profiles=ladder))
    set_workers(killed, 2)
    assert run_worker(killed, faults="micro_batch:sigkill@8").returncode == -signal.SIGKILL
    set_workers(killed, 0)
    second = run_worker(killed, attempt=2, faults="train_step:sigkill@14")
    assert second.returncode == -signal.SIGKILL, second.stdout + second.stderr
    assert "resumed from" in second.stdout and ", step 6, " in second.stdout
    set_workers(killed, 2)
    third = run_worker(killed, attempt=3)
    assert third.returncode == ExitCode.OK, third.stdout + third.stderr
    assert "resumed from" in third.stdout and ", step 12, " in third.stdout
    assert_same_weights(whole, killed)

    state, _, _ = checkpoint.load_latest(killed / "checkpoints", checkpoint.Verified())
    changed = dataclasses.replace(configlib.load(killed / "config.toml"), augment=section(re_prob=0.5))
    with pytest.raises(ConfigError, match="re_prob: checkpoint 0.25 vs now 0.5"):
        check_identity(manifest.settings_only(state["identity"]), fixed.identity(changed), killed)
