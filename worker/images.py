"""Decode one image file into a model input: a (3, size, size) uint8 tensor, train (random resized crop +
flip) or eval.

All randomness comes from the generator passed in, which the caller derives from
(seed, epoch, sample index): the result never depends on batch size, workers or restarts.
Training JPEGs are decoded at a reduced DCT scale (``draft``) whenever the crop allows it, and only down
to the last row the crop needs (jpeg_rows); the result is bit-identical to a full decode's.
Validation images are decoded whole and get timm's eval transform pixel for pixel (tests/test_eval_transform.py),
so a validation accuracy here is the accuracy timm's own evaluation would measure.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import jpeg_rows

RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
_TRANSPOSED = {5, 6, 7, 8}   # EXIF orientations that swap width and height
# The same turns for a whole Pillow image (as ImageOps.exif_transpose).
_ORIENT_PIL = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}
# How each EXIF orientation turns the stored image into the displayed one (as ImageOps.exif_transpose),
# for a (3, H, W) tensor.
_ORIENT = {2: lambda t: t.flip(2), 3: lambda t: t.flip(1, 2), 4: lambda t: t.flip(1), 5: lambda t: t.transpose(1, 2),
           6: lambda t: t.transpose(1, 2).flip(2), 7: lambda t: t.transpose(1, 2).flip(1, 2),
           8: lambda t: t.transpose(1, 2).flip(1)}
# torch's antialiased uint8 resampling is Pillow's filter (to within a level or two) and several times faster
# where torch has its AVX2 kernel (x86); elsewhere (Apple silicon) its generic kernel is slower than Pillow's.
_TORCH_FILTERS = {"bilinear", "bicubic"} if torch.backends.cpu.get_cpu_capability().startswith("AVX") else set()


class BadImage(Exception):
    """A file that cannot be used as a training image; the message is the reason."""


@dataclass(frozen=True)
class Recipe:
    """How to turn a file into a model input."""
    size: int
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_pixels: int = 89_478_485
    crop_mode: str = "center"   # timm's eval crop: "center", "squash" or "border"

    @property
    def fill(self) -> tuple[int, int, int]:
        """The model's mean colour: the background under transparency, the bad-image stand-in."""
        return tuple(int(round(255 * m)) for m in self.mean)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's augmentation: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([seed, epoch, index, 0xA06])


def load_train(path: str, recipe: Recipe, rng: np.random.Generator) -> torch.Tensor:
    """Random-resized-crop + horizontal flip, as in timm's training transform."""
    img, data = _open(path, recipe.max_pixels)
    orientation = _orientation(img)
    width, height = _oriented_size(img, orientation)
    top, left, h, w = _crop_params(width, height, recipe, rng)
    flip = rng.random() < recipe.hflip
    out = _crop_resize(img, data, orientation, (left, top, left + w, top + h), recipe)
    return out.flip(2) if flip else out


def load_eval(path: str, recipe: Recipe) -> torch.Tensor:
    """timm's eval transform (resize by 1 / crop_pct, centre crop), pixel for pixel, of the upright image.

    Beyond timm: the EXIF orientation is applied first, and 16-bit and transparent images are converted as
    `_to_rgb` does (timm's ``convert("RGB")`` clips 16-bit to white and drops transparency)."""
    img, _ = _open(path, recipe.max_pixels)
    orientation = _orientation(img)
    try:
        img.load()   # the whole image at full scale: a reduced or cut decode would change timm's pixels
        img = _to_rgb(img, recipe.fill)
    except Exception as e:   # truncated data, corrupt streams
        raise BadImage(_reason(e)) from None
    if orientation in _ORIENT_PIL:
        img = img.transpose(_ORIENT_PIL[orientation])
    img = img.resize(_eval_size(img.width, img.height, recipe), RESAMPLE.get(recipe.interpolation, Image.BICUBIC))
    return _chw(_centre_crop(img, recipe.size, recipe.fill))


def _eval_size(width: int, height: int, r: Recipe) -> tuple[int, int]:
    """(width, height) after timm's eval resize: torchvision's Resize(scale) by default (short side to `scale`,
    the long side truncated), a square for "squash", the long side to `scale` for "border"."""
    scale = math.floor(r.size / r.crop_pct)
    if r.crop_mode == "squash":
        return scale, scale
    if r.crop_mode == "border":   # timm's ResizeKeepRatio(longest=1)
        ratio = max(height / scale, width / scale)
        return round(width / ratio), round(height / ratio)
    if width <= height:
        return scale, int(scale * height / width)
    return int(scale * width / height), scale


def _centre_crop(img: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """torchvision's CenterCrop (timm's CenterCropOrPad where a side is short: padded with `fill` first)."""
    width, height = img.size
    if width < size or height < size:
        pad_left, pad_top = max(size - width, 0) // 2, max(size - height, 0) // 2
        padded = Image.new("RGB", (max(width, size), max(height, size)), fill)
        padded.paste(img, (pad_left, pad_top))
        img, width, height = padded, padded.width, padded.height
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _open(path: str, max_pixels: int) -> tuple[Image.Image, bytes]:
    """The image (header read, pixels not yet decoded) and the file's bytes."""
    try:
        with open(path, "rb") as f:   # one read; the bytes are needed again for a cut decode
            data = f.read()
        if not data:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max_pixels
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"larger than [data] max_image_pixels = {max_pixels} ({e.args[0].split('.')[0]})") from None
    except FileNotFoundError:
        raise BadImage("file disappeared") from None
    except BadImage:
        raise
    except Exception as e:   # UnidentifiedImageError, OSError, SyntaxError from broken headers
        raise BadImage(_reason(e)) from None
    if img.width < 1 or img.height < 1:
        raise BadImage(f"empty image ({img.width}x{img.height})")
    return img, data


def _reason(e: Exception) -> str:
    text = str(e).split("\n")[0]
    if "cannot identify image file" in text:
        return "not an image Pillow can read (wrong extension, or not an image at all)"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored); only JPEG/TIFF/WebP/PNG carry one."""
    return img.getexif().get(0x0112, 1) if "exif" in img.info or img.format in ("JPEG", "TIFF") else 1


def _oriented_size(img: Image.Image, orientation: int) -> tuple[int, int]:
    return (img.height, img.width) if orientation in _TRANSPOSED else (img.width, img.height)


def _crop_params(width: int, height: int, r: Recipe, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm/torchvision RandomResizedCrop.get_params with our generator: (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(r.crop_ratio[0]), math.log(r.crop_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*r.crop_scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < r.crop_ratio[0]:
        w, h = width, int(round(width / r.crop_ratio[0]))
    elif in_ratio > r.crop_ratio[1]:
        h, w = height, int(round(height * r.crop_ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _crop_resize(img: Image.Image, data: bytes, orientation: int, box: tuple[float, float, float, float],
                 r: Recipe) -> torch.Tensor:
    """Decode (at reduced scale, and only down to the crop where the file allows), convert to RGB, crop,
    resize, then orient the small result.

    `box` is in displayed (EXIF-oriented) pixels. The crop is cut out in stored orientation and in whole
    decoded pixels, and only it is resampled: a cut decode changes nothing but rows below it, so the result
    is bit-identical to a full decode's (tests/test_images.py). Orienting 224 px instead of the whole
    photo is cheaper too."""
    width, height = img.size   # stored, full resolution
    stored = _stored_box(box, orientation, width, height)
    scale = _dct_scale(min(box[2] - box[0], box[3] - box[1]) / r.size) if img.format == "JPEG" else 1
    try:
        if scale > 1:
            img.draft("RGB", (img.width // scale, img.height // scale))
        # The decoder rounds each side of a reduced image up on its own: scale per axis.
        sx, sy = img.width / width, img.height / height
        crop = _pixel_box((stored[0] * sx, stored[1] * sy, stored[2] * sx, stored[3] * sy), img.width, img.height)
        img = _cut_below(img, data, crop[3], scale)
        img.load()
        img = _to_rgb(img, r.fill)
    except Exception as e:   # truncated data, corrupt streams
        raise BadImage(_reason(e)) from None
    out = _resize(img.crop(crop), r)
    return _ORIENT[orientation](out) if orientation in _ORIENT else out


def _pixel_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """A box in decoded pixels rounded to whole pixels (at full scale it already is) and kept inside the image."""
    w = min(width, max(1, round(box[2] - box[0])))
    h = min(height, max(1, round(box[3] - box[1])))
    left = min(max(0, round(box[0])), width - w)
    top = min(max(0, round(box[1])), height - h)
    return left, top, left + w, top + h


def _resize(crop: Image.Image, r: Recipe) -> torch.Tensor:
    """The crop resampled to (3, size, size) uint8."""
    if r.interpolation in _TORCH_FILTERS:
        # (1, 3, H, W) over HWC memory is channels-last, the layout torch's fast uint8 kernel wants
        return torch.nn.functional.interpolate(_chw(crop)[None], size=(r.size, r.size), mode=r.interpolation,
                                               antialias=True)[0]
    return _chw(crop.resize((r.size, r.size), RESAMPLE.get(r.interpolation, Image.BICUBIC)))


def _chw(img: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as a (3, H, W) uint8 view of one copy in HWC order."""
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(2, 0, 1)


def _stored_box(box: tuple[float, float, float, float], orientation: int, width: int,
                height: int) -> tuple[float, float, float, float]:
    """A box in displayed pixels → the same region in stored pixels (`width` x `height` as stored)."""
    left, top, right, bottom = box
    return {2: (width - right, top, width - left, bottom),
            3: (width - right, height - bottom, width - left, height - top),
            4: (left, height - bottom, right, height - top),
            5: (top, left, bottom, right),
            6: (top, height - right, bottom, height - left),
            7: (width - bottom, height - right, width - top, height - left),
            8: (width - bottom, left, width - top, right)}.get(orientation, box)


def _dct_scale(reduction: float) -> int:
    """The JPEG decoder's smallest scale (1/8, 1/4, 1/2) that keeps the crop at least `size` pixels wide."""
    return next((s for s in (8, 4, 2) if reduction >= s), 1)


def _cut_below(img: Image.Image, data: bytes, bottom: int, scale: int) -> Image.Image:
    """The same JPEG declared only down to decoded row `bottom` plus one MCU row (see jpeg_rows), or `img`.

    The extra MCU row: the decoder's chroma upsampling at the last rows reads the row below, so the rows
    the crop takes are the same as a full decode's."""
    frame = jpeg_rows.sequential_frame(data) if img.format == "JPEG" else None
    if frame is None:
        return img
    rows = bottom * scale + frame.mcu_rows   # in stored full-resolution rows
    rows = -(-rows // frame.mcu_rows) * frame.mcu_rows
    if rows >= frame.height:
        return img
    cut = Image.open(io.BytesIO(jpeg_rows.cut(data, frame, rows)))
    if scale > 1:
        cut.draft("RGB", (cut.width // scale, cut.height // scale))
    return cut


def _to_rgb(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; transparency is laid over the model's mean colour."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.int64)
        a = (np.clip(a, 0, 65535) >> 8) if a.max(initial=0) > 255 else np.clip(a, 0, 255)
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, fill)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")
