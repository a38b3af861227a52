"""Validation pixels are timm's: our eval path against timm.data.create_transform(..., is_training=False)
on real JPEG and PNG files, normalised the way the worker normalises a batch."""
from __future__ import annotations

import pytest
import timm
import timm.data
import torch
from PIL import Image, ImageOps

from trainctl.contract import config as configlib
from trainctl.contract.folders import scan
from trainctl.worker import data
from trainctl.worker.images import Recipe, load_eval
from trainctl.worker.model import build_model, recipe_for
from trainctl.worker.data import normalize, pixel_stats

from conftest import config_text, photo

# Normalised values span about -2.2 .. 2.7; one uint8 level is 1 / (255 * std) ≈ 0.017. Measured: 2.4e-7
# (float32 rounding of the two normalisation formulas); the old crop-then-resize path was off by whole levels.
TOLERANCE = 1e-5
# (width, height, file name): landscape, portrait, near-square, a large photo (the train path would decode it
# at reduced scale), smaller than the crop (upsampled), grey and CMYK JPEGs (timm and we convert them alike).
FILES = [(300, 200, "land.jpg"), (200, 333, "portrait.jpg"), (1024, 683, "large.jpg"), (97, 131, "odd.png"),
         (640, 480, "photo.png"), (50, 40, "small.png"), (101, 77, "gray.jpg"), (120, 90, "cmyk.jpg")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    out = []
    for i, (w, h, name) in enumerate(FILES):
        img = photo(w, h, seed=i, noise=20)   # every crop offset and filter tap shows
        if name == "gray.jpg":
            img = img.convert("L")
        elif name == "cmyk.jpg":
            img = img.convert("CMYK")
        img.save(d / name, **({"quality": 90} if name.endswith(".jpg") else {}))
        out.append(d / name)
    return out


@pytest.fixture(scope="module")
def model():
    return timm.create_model("resnet18", pretrained=False, num_classes=2)


def timm_eval(path, data_cfg: dict) -> torch.Tensor:
    """timm's validation input: its dataset opens the file with Pillow and converts to RGB, then the transform."""
    with open(path, "rb") as f:
        img = Image.open(f).convert("RGB")
    return timm.data.create_transform(**data_cfg, is_training=False)(img)


def recipe_from(data_cfg: dict) -> Recipe:
    """A recipe with timm's resolved data config (what worker.model.recipe_for builds)."""
    return Recipe(size=int(data_cfg["input_size"][-1]), interpolation=data_cfg["interpolation"],
                  crop_pct=data_cfg["crop_pct"], mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]),
                  crop_mode=data_cfg["crop_mode"])


def ours(path, recipe: Recipe) -> torch.Tensor:
    """Our validation input, normalised as the worker normalises a batch."""
    mean, std = pixel_stats(recipe, "cpu")
    return normalize(load_eval(str(path), recipe)[None], mean, std)[0]


def worst_difference(files, data_cfg: dict) -> float:
    recipe = recipe_from(data_cfg)
    worst = 0.0
    for path in files:
        want, got = timm_eval(path, data_cfg), ours(path, recipe)
        assert got.shape == want.shape == (3, recipe.size, recipe.size)
        worst = max(worst, float((got - want).abs().max()))
    return worst


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [32, 64, 224])
@pytest.mark.parametrize("crop_pct", [0.875, 0.9, 0.95, 1.0])
def test_validation_pixels_equal_timms_eval_transform(files, model, size, crop_pct, interpolation):
    data_cfg = timm.data.resolve_data_config({"input_size": (3, size, size), "crop_pct": crop_pct,
                                              "interpolation": interpolation}, model=model)
    assert data_cfg["crop_mode"] == "center" and data_cfg["crop_pct"] == crop_pct
    assert worst_difference(files, data_cfg) <= TOLERANCE


@pytest.mark.parametrize("crop_mode", ["squash", "border"])
@pytest.mark.parametrize("size,crop_pct", [(32, 0.875), (64, 1.0), (224, 0.95)])
def test_timms_other_crop_modes_are_followed_too(files, model, crop_mode, size, crop_pct):
    """Some timm models' pretrained configs ask for "squash" (dm_nfnet_f0, efficientnet_b5) or "border"."""
    data_cfg = timm.data.resolve_data_config({"input_size": (3, size, size), "crop_pct": crop_pct,
                                              "crop_mode": crop_mode}, model=model)
    assert data_cfg["crop_mode"] == crop_mode
    assert worst_difference(files, data_cfg) <= TOLERANCE


@pytest.mark.parametrize("model_name", ["test_vit", "convnextv2_nano.fcmae_ft_in22k_in1k_384"])   # centre; squash
def test_the_workers_validation_batches_equal_timms(tmp_path, dataset, files, model_name):
    """The real path: the run's model and recipe (recipe_for), the validation folder's micro-batches, the
    worker's normalisation — against timm's transform with the same model's data config (its crop mode too)."""
    for i, path in enumerate(files):
        folder = tmp_path / "val" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / path.name).write_bytes(path.read_bytes())
    config = tmp_path / "run.toml"
    config.write_text(config_text("eval", dataset, model={"name": model_name, "img_size": 64}))
    cfg = configlib.load(config)
    net = build_model(cfg, 2)
    recipe = recipe_for(cfg, net)
    data_cfg = timm.data.resolve_data_config({"input_size": (3, 64, 64)}, model=net)
    assert recipe.crop_mode == data_cfg.get("crop_mode", "center")
    val = scan(tmp_path / "val", (".jpg", ".png"), "[data] val_dir", ("a", "b"))
    batches = data.MicroBatches(val, recipe, 7, 3, train=False)
    mean, std = pixel_stats(recipe, "cpu")
    checked = 0
    for key in data.eval_keys(len(val), 3)():
        mb = batches[key]
        got = normalize(mb.images, mean, std)
        for slot, index in enumerate(batches.indices(*key, 3)):
            want = timm_eval(val.paths[int(index)], data_cfg)
            assert float((got[slot] - want).abs().max()) <= TOLERANCE, val.paths[int(index)]
            checked += 1
    assert checked == len(files) == len(val)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_beyond_timm_the_exif_orientation_is_applied_first(tmp_path, model, orientation):
    """timm feeds a phone photo as stored (on its side); we feed it upright: timm's pixels of the upright photo."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.jpg"
    photo(160, 90, seed=orientation).save(path, quality=92, exif=exif)
    upright = tmp_path / "upright.png"
    ImageOps.exif_transpose(Image.open(path).convert("RGB")).save(upright)   # lossless, no EXIF turn left
    data_cfg = timm.data.resolve_data_config({"input_size": (3, 64, 64), "crop_pct": 0.9}, model=model)
    got, want = ours(path, recipe_from(data_cfg)), timm_eval(upright, data_cfg)
    assert float((got - want).abs().max()) <= TOLERANCE
    assert float((got - timm_eval(path, data_cfg)).abs().max()) > 0.5   # timm's own way differs: not vacuous
