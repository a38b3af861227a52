"""Decode one image file into a fixed-size RGB image: train (random resized crop + flip) or eval.

All randomness comes from the generator passed in, which the caller derives from
(seed, epoch, sample index): the result never depends on batch size, workers or restarts.
JPEGs are decoded at a reduced DCT scale (``draft``) whenever the crop allows it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
_TRANSPOSED = {5, 6, 7, 8}   # EXIF orientations that swap width and height


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

    @property
    def fill(self) -> tuple[int, int, int]:
        """The model's mean colour: the background under transparency, the bad-image stand-in."""
        return tuple(int(round(255 * m)) for m in self.mean)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's augmentation: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([seed, epoch, index, 0xA06])


def load_train(path: str, recipe: Recipe, rng: np.random.Generator) -> Image.Image:
    """Random-resized-crop + horizontal flip, as in timm's training transform."""
    img = _open(path, recipe.max_pixels)
    orientation = _orientation(img)
    width, height = _oriented_size(img, orientation)
    top, left, h, w = _crop_params(width, height, recipe, rng)
    flip = rng.random() < recipe.hflip
    out = _crop_resize(img, orientation, (left, top, left + w, top + h), recipe)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


def load_eval(path: str, recipe: Recipe) -> Image.Image:
    """Resize the short side to size / crop_pct and take the centre crop, as timm's eval transform."""
    img = _open(path, recipe.max_pixels)
    orientation = _orientation(img)
    width, height = _oriented_size(img, orientation)
    scale_size = math.floor(recipe.size / recipe.crop_pct)
    side = recipe.size * min(width, height) / scale_size   # the crop's side in source pixels
    left, top = (width - side) / 2, (height - side) / 2
    return _crop_resize(img, orientation, (left, top, left + side, top + side), recipe)


def _open(path: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max_pixels
            img = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"larger than [data] max_image_pixels = {max_pixels} ({e.args[0].split('.')[0]})") from None
    except FileNotFoundError:
        raise BadImage("file disappeared") from None
    except Exception as e:   # UnidentifiedImageError, OSError, SyntaxError from broken headers
        raise BadImage(_reason(e)) from None
    if img.width < 1 or img.height < 1:
        raise BadImage(f"empty image ({img.width}x{img.height})")
    return img


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


def _crop_resize(img: Image.Image, orientation: int, box: tuple[float, float, float, float], r: Recipe) -> Image.Image:
    """Decode (at reduced scale if the crop allows), orient, convert to RGB, crop and resize in one go."""
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    reduction = min(box_w, box_h) / r.size
    oriented_w, oriented_h = _oriented_size(img, orientation)
    try:
        if reduction >= 2 and img.format == "JPEG":
            img.draft("RGB", (math.ceil(img.width / reduction), math.ceil(img.height / reduction)))
        img.load()
        if orientation != 1:   # exif_transpose copies even when there is nothing to do
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img, r.fill)
    except Exception as e:   # truncated data, corrupt streams
        raise BadImage(_reason(e)) from None
    # Draft scale (1, 1/2, 1/4 or 1/8), per axis: the decoder rounds each side up on its own, and a
    # box past the edge by a rounding error is an error in Pillow, so clamp it too.
    sx, sy = img.width / oriented_w, img.height / oriented_h
    scaled = (max(0.0, box[0] * sx), max(0.0, box[1] * sy), min(img.width, box[2] * sx), min(img.height, box[3] * sy))
    return img.resize((r.size, r.size), RESAMPLE.get(r.interpolation, Image.BICUBIC), box=scaled)


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
