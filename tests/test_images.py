"""Decoding real files of every awkward kind: never a crash, always a fixed-size RGB image or a reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from trainctl.worker.images import BadImage, Recipe, load_eval, load_train, sample_rng

from conftest import photo

RECIPE = Recipe(size=32, crop_scale=(0.5, 1.0), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def hwc(pixels: torch.Tensor) -> np.ndarray:
    """A loader's (3, H, W) output as an (H, W, 3) int array, to compare with Pillow's."""
    return pixels.permute(1, 2, 0).numpy().astype(int)


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
        assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 32, 32)


@pytest.mark.parametrize("kind,reason", [("truncated", "truncated"), ("empty", "empty file"),
                                         ("text", "not an image"), ("bomb", "max_image_pixels")])
def test_unreadable_kinds_raise_bad_image_with_a_reason(files, kind, reason):
    with pytest.raises(BadImage, match=reason):
        load_train(str(files[kind]), RECIPE, sample_rng(1, 0, 3))
    with pytest.raises(BadImage, match=reason):
        load_eval(str(files[kind]), RECIPE)


def test_a_zero_byte_file_is_called_an_empty_file(files):
    with pytest.raises(BadImage) as caught:
        load_train(str(files["empty"]), RECIPE, sample_rng(1, 0, 3))
    assert str(caught.value) == "empty file (0 bytes)"   # not "not an image Pillow can read"


def test_sixteen_bit_keeps_its_range(files):
    arr = np.asarray(load_eval(str(files["gray16"]), RECIPE))
    assert arr.min() < 40 and arr.max() > 200   # not clipped to white, not crushed to black


def test_transparency_becomes_the_mean_colour(files):
    arr = np.asarray(load_eval(str(files["transparent"]), RECIPE))
    assert (arr == 128).all()   # mean 0.5 → 128: zero after normalisation


def test_exif_orientation_is_applied(files):
    # 80x40 landscape stored with "rotate 90° CW": displayed as portrait, gradient x → y.
    arr = hwc(load_eval(str(files["rotated"]), Recipe(size=32, crop_pct=1.0)))
    assert arr[-1, :, 0].mean() - arr[0, :, 0].mean() > 60   # the red (x) gradient now runs top → bottom


def test_augmentation_is_a_pure_function_of_seed_epoch_index(files):
    path = str(files["big"])
    a = load_train(path, RECIPE, sample_rng(5, 2, 17)).numpy().tobytes()
    assert a == load_train(path, RECIPE, sample_rng(5, 2, 17)).numpy().tobytes()
    others = {load_train(path, RECIPE, sample_rng(5, e, 17)).numpy().tobytes() for e in range(3, 8)}
    assert a not in others and len(others) > 1


def test_large_jpegs_decode_at_reduced_scale(files, monkeypatch):
    from PIL import JpegImagePlugin
    seen = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        seen.append(size)
        return real(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    load_train(str(files["big"]), RECIPE, sample_rng(1, 0, 3))   # a crop of at least half the photo, to 32 px
    assert seen and max(seen[0]) < 1200


@pytest.mark.parametrize("width,height", [(617, 502), (1001, 999), (517, 1333)])
def test_reduced_scale_crops_of_odd_sized_photos_stay_inside_the_image(tmp_path, width, height):
    """Found by bench/data_path.py: the decoder rounds each side of a reduced image up on its own, and a
    crop box scaled by one factor ran past the edge ("box can't exceed original image size")."""
    path = tmp_path / "odd.jpg"
    photo(width, height).save(path, quality=90)
    recipe = Recipe(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))   # timm's crop scale (0.08, 1)
    for i in range(300):
        assert tuple(load_train(str(path), recipe, sample_rng(0, 0, i)).shape) == (3, 224, 224)


@pytest.mark.parametrize("kind", ["4:4:4", "4:2:2", "4:2:0", "L", "CMYK"])
def test_decoding_only_down_to_the_crop_is_bit_identical_to_a_full_decode(tmp_path, monkeypatch, kind):
    """Every EXIF orientation (a cut removes the stored bottom, which some show on top or on the left),
    reduced DCT scales 1 to 1/8, the widest resize filter: the cut decode must not change one byte.
    (Training crops only: validation images are decoded whole, as timm does.)"""
    from trainctl.worker import jpeg_rows
    paths = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        paths.append(tmp_path / f"o{orientation}.jpg")
        img = photo(797, 601, seed=orientation)
        if kind in ("L", "CMYK"):
            img.convert(kind).save(paths[-1], quality=90, exif=exif)
        else:
            img.save(paths[-1], quality=90, subsampling=kind, exif=exif)
    recipes = [Recipe(size=32, crop_scale=(0.08, 1.0)), Recipe(size=40, crop_scale=(0.08, 1.0), interpolation="lanczos")]

    def decode_all():
        return [load_train(str(p), r, sample_rng(0, 0, i)).numpy().tobytes() for p in paths for r in recipes
                for i in range(12)]

    cuts, real_cut = [], jpeg_rows.cut
    monkeypatch.setattr(jpeg_rows, "cut", lambda data, frame, rows: cuts.append(rows) or real_cut(data, frame, rows))
    got = decode_all()
    monkeypatch.setattr(jpeg_rows, "sequential_frame", lambda data: None)   # every file decoded whole
    want = decode_all()
    assert len(cuts) > len(got) // 3   # the comparison is not vacuous: many decodes were cut
    assert [i for i, (a, b) in enumerate(zip(got, want)) if a != b] == []


@pytest.mark.parametrize("scale", [1, 2])
def test_a_cut_leaves_every_row_above_it_exact_even_at_a_block_row_boundary(tmp_path, monkeypatch, scale):
    """4:2:0 chroma is upsampled from the chroma row below too: a file cut right under the crop would
    change the crop's last row (by up to tens of levels). The cut keeps one block row (MCU row) more.

    Each photo is a portrait whose centre square crop (a training crop that cannot fit its scale and ratio
    falls back to it; resized to its own decoded size) ends at decoded row `bottom`; the decode cut below it
    must give the very bytes of a whole-file decode."""
    from trainctl.worker import jpeg_rows
    side = 48
    for bottom in (80 // scale, 83 // scale, 96 // scale, 97 // scale):   # block rows are 16 stored rows
        stored_bottom = bottom * scale
        height = 2 * stored_bottom - side            # the centre crop spans stored rows height - bottom .. bottom
        path = tmp_path / f"p{bottom}.jpg"
        photo(side, height, seed=3).save(path, quality=90, subsampling="4:2:0")
        # The whole area at ratio 1 never fits a portrait: the crop is the centre square, `scale` times its
        # output (a 1/scale decode).
        recipe = Recipe(size=side // scale, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0)
        cuts, real_cut = [], jpeg_rows.cut
        with monkeypatch.context() as m:
            m.setattr(jpeg_rows, "cut", lambda data, frame, rows: cuts.append(rows) or real_cut(data, frame, rows))
            got = load_train(str(path), recipe, sample_rng(0, 0, 0))
        with monkeypatch.context() as m:
            m.setattr(jpeg_rows, "sequential_frame", lambda data: None)   # decoded whole
            want = load_train(str(path), recipe, sample_rng(0, 0, 0))
        assert cuts and cuts[0] < height, (bottom, cuts)               # the file was cut
        assert tuple(got.shape) == (3, side // scale, side // scale)
        assert torch.equal(got, want), (bottom, (got.int() - want.int()).abs().max(dim=2).values.max(dim=0).values)


def test_only_sequential_single_scan_jpegs_are_cut(tmp_path):
    from trainctl.worker import jpeg_rows
    img = photo(120, 90)
    img.save(tmp_path / "baseline.jpg", quality=90)
    img.save(tmp_path / "progressive.jpg", quality=90, progressive=True)
    img.convert("L").save(tmp_path / "gray.jpg", quality=90)
    img.save(tmp_path / "fine.jpg", quality=90, subsampling=0)
    frame = jpeg_rows.sequential_frame((tmp_path / "baseline.jpg").read_bytes())
    assert frame is not None and frame.height == 90 and frame.mcu_rows == 16
    assert jpeg_rows.sequential_frame((tmp_path / "gray.jpg").read_bytes()).mcu_rows == 8
    assert jpeg_rows.sequential_frame((tmp_path / "fine.jpg").read_bytes()).mcu_rows == 8
    assert jpeg_rows.sequential_frame((tmp_path / "progressive.jpg").read_bytes()) is None
    assert jpeg_rows.sequential_frame(b"\xff\xd8 not a jpeg") is None
    data = (tmp_path / "baseline.jpg").read_bytes()
    assert jpeg_rows.sequential_frame(data[:-2]) is None   # no end-of-image marker: a truncated file
    broken = bytearray(data)
    broken[frame.height_at + 6] = 0x10   # the first component's sampling: horizontal 1, vertical 0 (malformed)
    assert jpeg_rows.sequential_frame(bytes(broken)) is None
    top = Image.open(io.BytesIO(jpeg_rows.cut(data, frame, 32)))
    assert top.size == (120, 32)
    assert np.array_equal(np.asarray(top)[:16], np.asarray(Image.open(tmp_path / "baseline.jpg"))[:16])


def test_a_truncated_file_is_bad_even_when_the_crop_lies_in_its_intact_top(tmp_path):
    path = tmp_path / "half.jpg"
    photo(800, 600).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    top_crops = Recipe(size=32, crop_scale=(0.08, 0.1))
    for i in range(20):
        with pytest.raises(BadImage, match="truncated"):
            load_train(str(path), top_crops, sample_rng(0, 0, i))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_resampling_in_stored_orientation_matches_orienting_the_photo_first(tmp_path, orientation):
    """The crop is drawn in displayed pixels and resampled in stored ones: a wrong mapping would crop the
    wrong place. Compared with the plain way (orient the decoded photo first, and crop and resize that with
    the same filter: the same loader on a lossless copy of the oriented photo, which has no EXIF turn and
    draws the same crop from the same generator), at full decoding scale."""
    from PIL import ImageOps
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    photo(300, 200, seed=orientation).save(path, quality=95, exif=exif)
    recipe = Recipe(size=128, crop_scale=(0.08, 1.0), hflip=0.0)   # < 2x reduction: no reduced-scale decode
    shown = ImageOps.exif_transpose(Image.open(path).convert("RGB"))
    shown.save(tmp_path / "shown.png")
    assert Image.open(tmp_path / "shown.png").getexif().get(0x0112, 1) == 1
    for i in range(20):
        want = hwc(load_train(str(tmp_path / "shown.png"), recipe, sample_rng(0, 0, i)))
        got = hwc(load_train(str(path), recipe, sample_rng(0, 0, i)))
        # equal but for rounding (a level or two: the two resampling passes run in the other order on a
        # turned image); a misplaced crop is off by tens (the photo's noise)
        diff = np.abs(got - want)
        assert diff.max() <= 3 and diff.mean() < 0.5, (i, diff.max(), diff.mean())


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_the_resampling_filter_is_pillows_whichever_library_runs_it(tmp_path, interpolation):
    """On x86 torch's antialiased uint8 kernel resamples (several times faster), elsewhere Pillow: the same
    filter, so a photo comes out the same to within a level or two (bicubic's overshoot is clipped between
    the two passes, which the two libraries may run in different orders). The loader is given the whole
    photo as its crop (scale 1, the photo's own aspect ratio, no flip) and resizes it to 224 x 224."""
    from trainctl.worker.images import RESAMPLE
    for w, h in ((300, 257), (447, 390), (224, 224), (150, 100)):   # down, down, same, up
        crop = photo(w, h, seed=w)
        path = tmp_path / f"{w}x{h}.png"
        crop.save(path)   # lossless: the loader sees these very pixels
        recipe = Recipe(size=224, interpolation=interpolation, crop_scale=(1.0, 1.0), crop_ratio=(w / h, w / h),
                        hflip=0.0)
        ours = hwc(load_train(str(path), recipe, sample_rng(0, 0, 0)))
        pillow = np.asarray(crop.resize((224, 224), RESAMPLE[interpolation])).astype(int)
        diff = np.abs(ours - pillow)
        assert diff.max() <= 2 and diff.mean() < 0.05, (w, h, diff.max(), diff.mean())
