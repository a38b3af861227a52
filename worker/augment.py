"""[augment]: timm's own training augmentations on the fast data path, every draw a function of (seed, epoch, index).

What timm's ``create_transform(..., is_training=True)`` does after its random-resized crop and flip (images.py does
those): auto_augment (RandAugment / AutoAugment / AugMix) or colour jitter on the small crop, a PIL image; then,
after normalisation, random erasing. The transforms are timm's, built by timm's factory with the run's values.

Determinism: timm's ops draw from the process's global generators (Python's `random`, NumPy's legacy one, torch's
CPU one). For each sample they are seeded from (seed, epoch, index) just before timm's transforms run, and put back
as they were right after (`seeded`). So a sample's augmentation is the same in the training process
(num_workers = 0) and in a loader process, after any restart, on any rung; and the training process's own streams
(dropout and drop path, re-seeded per step) are left as they were. Only the CPU generator of torch is touched:
timm's erasing draws its noise there (device='cpu', as its factory builds it), never on CUDA or MPS.

Random erasing works on normalised floats, the micro-batches stay uint8: the loader runs timm's RandomErasing on a
stand-in image (`_Canvas`) that records each patch it would write, its place and its fill; the training step lays
the patches on the normalised batch (`erase`). The result is timm's, value for value.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from trainctl.contract.config import AugmentSection, ConfigError
from trainctl.contract.augment_rules import AUTO_AUGMENT_FIX

_TAG = 0xA06A   # keeps these seeds apart from the crop and flip's (images.sample_rng)


@dataclass(frozen=True)
class Patch:
    """One erased rectangle of micro-batch slot `slot`, in normalised units: (3, height, width) or (3, 1, 1) values."""
    slot: int
    top: int
    left: int
    height: int
    width: int
    fill: np.ndarray


def is_on(section: AugmentSection | None) -> bool:
    """Whether [augment] asks for any augmentation (all off: the data path is exactly what it was without it)."""
    return section is not None and bool(section.auto_augment or section.color_jitter or section.re_prob)


class Augmenter:
    """timm's training augmentations for one recipe (images.Recipe), applied per sample."""

    def __init__(self, section: AugmentSection, recipe):
        self.pil, self.eraser = build(section, recipe)

    def __call__(self, pixels: torch.Tensor, slot: int, seed: int, epoch: int, index: int):
        """A (3, H, W) uint8 crop → (the augmented crop, its erasing patches), drawn from (seed, epoch, index)."""
        with seeded(seed, epoch, index):
            if self.pil is not None:
                image = Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
                pixels = torch.from_numpy(np.array(self.pil(image), dtype=np.uint8)).permute(2, 0, 1)
            patches = self._erasing(pixels.shape, slot) if self.eraser is not None else []
        return pixels, patches

    def _erasing(self, shape, slot: int) -> list[Patch]:
        canvas = _Canvas(tuple(shape))
        self.eraser(canvas)
        return [Patch(slot, *where, fill) for *where, fill in canvas.patches]


def build(section: AugmentSection, recipe):
    """(the PIL-image transform or None, timm's RandomErasing or None), as timm's transforms factory builds them."""
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms_factory import transforms_imagenet_train
    try:
        _, secondary, final = transforms_imagenet_train(
            recipe.size, interpolation=recipe.interpolation, mean=recipe.mean, std=recipe.std,
            auto_augment=section.auto_augment or None, color_jitter=section.color_jitter or None,
            re_prob=section.re_prob, re_mode=section.re_mode, re_count=section.re_count, separate=True)
    except (AssertionError, ValueError, KeyError, TypeError, IndexError) as e:   # timm's parser refuses the string
        if not section.auto_augment:
            raise
        raise ConfigError(f"[augment] auto_augment = {section.auto_augment!r} is not understood by timm "
                          f"({type(e).__name__}: {e}). Fix: {AUTO_AUGMENT_FIX}.") from None
    keep_zero_bits(secondary)
    erasers = [t for t in final.transforms if isinstance(t, RandomErasing)]
    return (secondary if secondary.transforms else None), (erasers[0] if erasers else None)


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize op, also for 0 bits. timm asks for 0 (its Posterize at magnitudes below 2.5, PosterizeIncreasing
    at 10, which rand-m9-mstd0.5-inc1 reaches in 2% of its draws, AutoAugment v0's ('Posterize', 0.8, 2)); Pillow
    before 13 then kept no bit, a black image, and Pillow 13 raises ValueError: a crash at that sample, on every retry."""
    from timm.data import auto_augment
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def keep_zero_bits(transform) -> None:
    """Point the posterize ops of a built timm transform (a Compose of RandAugment, AutoAugment, AugMix...) at
    `posterize`."""
    from timm.data import auto_augment
    ops = []
    for t in getattr(transform, "transforms", [transform]):
        ops += list(getattr(t, "ops", [])) + [op for sub in getattr(t, "policy", []) for op in sub]
    for op in ops:
        if isinstance(op, auto_augment.AugmentOp) and op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize


def sample_seeds(seed: int, epoch: int, index: int) -> tuple[int, int, int]:
    """Seeds for Python's, NumPy's and torch's generators for one sample: a pure function of (seed, epoch, index)."""
    words = np.random.SeedSequence([seed, epoch, index, _TAG]).generate_state(3)
    return int(words[0]), int(words[1]), int(words[2])


@contextlib.contextmanager
def seeded(seed: int, epoch: int, index: int):
    """The global generators seeded for sample (seed, epoch, index) inside, as they were before outside."""
    saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    python, numpy, torch_seed = sample_seeds(seed, epoch, index)
    random.seed(python)
    np.random.seed(numpy)
    torch.default_generator.manual_seed(torch_seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.default_generator.set_state(saved[2])


class _Canvas:
    """Stands in for a normalised (C, H, W) float image under timm's RandomErasing: records what it writes where."""

    dtype = torch.float32

    def __init__(self, shape: tuple[int, int, int]):
        self.shape, self.patches = shape, []

    def size(self) -> torch.Size:
        return torch.Size(self.shape)

    def __setitem__(self, key, value: torch.Tensor) -> None:
        _, rows, cols = key   # img[:, top:top + h, left:left + w] = pixels
        self.patches.append((rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start,
                             value.numpy().copy()))


def erase(images: torch.Tensor, patches: list[Patch]) -> torch.Tensor:
    """Lay a micro-batch's erasing patches on its normalised images, in place (none: `images` as they are)."""
    for p in patches:
        images[p.slot, :, p.top:p.top + p.height, p.left:p.left + p.width] = torch.from_numpy(p.fill).to(images.device)
    return images
