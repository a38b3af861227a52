"""Decoding real files of every awkward kind: never a crash, always a fixed-size RGB image or a reason."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainctl.worker.images import BadImage, Recipe, load_eval, load_train, sample_rng

RECIPE = Recipe(size=32, crop_scale=(0.5, 1.0), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with noise: JPEG-friendly, and orientation is visible."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    base = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                           np.full((h, w, 1), 60.0)], axis=2)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    f = {}
    photo(300, 200).save(d / "rgb.jpg", quality=92)
    f["rgb"] = d / "rgb.jpg"
    photo(1200, 900).save(d / "big.jpg", quality=90)
    f["big"] = d / "big.jpg"
    photo(120, 80).convert("CMYK").save(d / "cmyk.jpg")
    f["cmyk"] = d / "cmyk.jpg"
    sixteen = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(sixteen).save(d / "gray16.png")
    f["gray16"] = d / "gray16.png"
    photo(64, 64).convert("L").save(d / "gray.png")
    f["gray"] = d / "gray.png"
    pal = photo(64, 64).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    f["palette"] = d / "palette.png"
    rgba = photo(64, 64).convert("RGBA")
    rgba.putalpha(Image.new("L", (64, 64), 0))          # fully transparent
    rgba.save(d / "transparent.png")
    f["transparent"] = d / "transparent.png"
    la = photo(64, 64).convert("LA")
    la.save(d / "la.png")
    f["la"] = d / "la.png"
    tiny = Image.new("RGB", (1, 1), (200, 10, 10))
    tiny.save(d / "one.png")
    f["one"] = d / "one.png"
    exif = Image.Exif()
    exif[0x0112] = 6                                       # rotate 90° clockwise to display
    photo(80, 40).save(d / "rotated.jpg", exif=exif, quality=95)
    f["rotated"] = d / "rotated.jpg"
    data = f["rgb"].read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    f["truncated"] = d / "truncated.jpg"
    (d / "empty.jpg").write_bytes(b"")
    f["empty"] = d / "empty.jpg"
    (d / "notes.jpg").write_text("these are my notes, not a picture\n")
    f["text"] = d / "notes.jpg"
    Image.new("1", (10_000, 10_000)).save(d / "bomb.png")  # 100 M pixels: past Pillow's 89 M limit
    f["bomb"] = d / "bomb.png"
    return f


@pytest.mark.parametrize("kind", ["rgb", "big", "cmyk", "gray16", "gray", "palette", "transparent", "la", "one",
                                  "rotated"])
def test_readable_kinds_give_fixed_size_rgb(files, kind):
    for img in (load_train(str(files[kind]), RECIPE, sample_rng(1, 0, 3)), load_eval(str(files[kind]), RECIPE)):
        assert img.mode == "RGB" and img.size == (32, 32)


@pytest.mark.parametrize("kind,reason", [("truncated", "truncated"), ("empty", "not an image"),
                                         ("text", "not an image"), ("bomb", "max_image_pixels")])
def test_unreadable_kinds_raise_bad_image_with_a_reason(files, kind, reason):
    with pytest.raises(BadImage, match=reason):
        load_train(str(files[kind]), RECIPE, sample_rng(1, 0, 3))
    with pytest.raises(BadImage):
        load_eval(str(files[kind]), RECIPE)


def test_sixteen_bit_keeps_its_range(files):
    arr = np.asarray(load_eval(str(files["gray16"]), RECIPE))
    assert arr.min() < 40 and arr.max() > 200   # not clipped to white, not crushed to black


def test_transparency_becomes_the_mean_colour(files):
    arr = np.asarray(load_eval(str(files["transparent"]), RECIPE))
    assert (arr == 128).all()   # mean 0.5 → 128: zero after normalisation


def test_exif_orientation_is_applied(files):
    # 80x40 landscape stored with "rotate 90° CW": displayed as portrait, gradient x → y.
    img = load_eval(str(files["rotated"]), Recipe(size=32, crop_pct=1.0))
    arr = np.asarray(img).astype(int)
    assert arr[-1, :, 0].mean() - arr[0, :, 0].mean() > 60   # the red (x) gradient now runs top → bottom


def test_augmentation_is_a_pure_function_of_seed_epoch_index(files):
    path = str(files["big"])
    a = load_train(path, RECIPE, sample_rng(5, 2, 17)).tobytes()
    assert a == load_train(path, RECIPE, sample_rng(5, 2, 17)).tobytes()
    others = {load_train(path, RECIPE, sample_rng(5, e, 17)).tobytes() for e in range(3, 8)}
    assert a not in others and len(others) > 1


def test_large_jpegs_decode_at_reduced_scale(files, monkeypatch):
    from PIL import JpegImagePlugin
    seen = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        seen.append(size)
        return real(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    load_eval(str(files["big"]), RECIPE)
    assert seen and max(seen[0]) < 1200


@pytest.mark.parametrize("width,height", [(617, 502), (1001, 999), (517, 1333)])
def test_reduced_scale_crops_of_odd_sized_photos_stay_inside_the_image(tmp_path, width, height):
    """Found by bench/data_path.py: the decoder rounds each side of a reduced image up on its own, and a
    crop box scaled by one factor ran past the edge ("box can't exceed original image size")."""
    path = tmp_path / "odd.jpg"
    photo(width, height).save(path, quality=90)
    recipe = Recipe(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))   # timm's crop scale (0.08, 1)
    for i in range(300):
        assert load_train(str(path), recipe, sample_rng(0, 0, i)).size == (224, 224)
