"""Micro-batches as uint8 tensors ready for in-place normalisation, in the epoch order of `folders`.

Order: epoch e visits the samples in ``permutation(seed, e)``; an optimizer step consumes
``effective_batch_size`` consecutive entries, split into micro-batches of the rung's batch size.
The resume point is a sample cursor in that order, so any rung can continue any checkpoint.
The ragged tail of an epoch (fewer than one effective batch) is skipped: every step has the same
shape and sample count on every rung (fixed shapes also keep the MPS graph cache from growing).
"""
from __future__ import annotations

import dataclasses
import os
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from trainctl.contract.folders import Folder, epoch_order

from .augment import Augmenter, Patch, erase, is_on  # noqa: F401 (erase: the training step's call, data.erase)
from .images import BadImage, Recipe, load_eval, load_train, sample_rng


@dataclass
class MicroBatch:
    """uint8 images (B, 3, H, W), labels, a validity mask, the bad files with reasons and the random-erasing patches
    to lay on the normalised images ([augment] re_prob: augment.erase)."""
    images: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    bad: list[tuple[str, str]]
    erased: list[Patch] = field(default_factory=list)
    # With Mixup/CutMix (MicroBatches.pairing): where the micro-batch sits in its optimizer step, and each sample's
    # partner (position E-1-i of the step) — its image, label, validity and erasing patches, slot for slot.
    epoch: int = 0
    step: int = 0                 # the optimizer step within the epoch
    first_position: int = 0       # the position of slot 0 in the step's effective batch
    partner: MicroBatch | None = None


class MicroBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item is one whole micro-batch, keyed by (epoch, start position).

    Keyed this way, a DataLoader's workers can load any micro-batch of any epoch without sharing
    state, and the result is the same whichever process loads it.
    """

    def __init__(self, folder: Folder, recipe: Recipe, seed: int, batch_size: int, train: bool, augment=None,
                 pairing: int | None = None):
        self.folder, self.recipe, self.seed = folder, recipe, seed
        self.batch_size, self.train = batch_size, train
        self.pairing = pairing   # Mixup/CutMix: the effective batch whose positions i and E-1-i are partners
        self._step_samples: dict[int, tuple] = {}   # with pairing: this step's decoded samples (each decoded once)
        self._step_key = None
        self.decoded = 0   # samples decoded by this process (bench/mixup_cost.py: Mixup's extra decode work)
        # [augment] (an AugmentSection): training images only, validation is never augmented
        self.augment = Augmenter(augment, recipe) if train and is_on(augment) else None
        self._order_epoch, self._order = None, None
        size = recipe.size
        # Bad images become this pre-computed tensor: the mean colour, i.e. zero once normalised.
        self.dummy = torch.tensor(recipe.fill, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size)

    def order(self, epoch: int) -> np.ndarray:
        if not self.train:
            return np.arange(len(self.folder))
        if self._order_epoch != epoch:
            self._order, self._order_epoch = epoch_order(self.seed, epoch, len(self.folder)), epoch
        return self._order

    def indices(self, epoch: int, start: int, count: int) -> np.ndarray:
        return self.order(epoch)[start:start + count]

    def __getitem__(self, key: tuple[int, int]) -> MicroBatch:
        epoch, start = key
        if not self.pairing:
            return self._load(epoch, self.indices(epoch, start, self.batch_size))
        # Mixup/CutMix: the partner of position i is E-1-i of the same step, wherever it lies. The step's samples
        # are kept while its micro-batches load, so a sample decoded as a partner is not decoded again as its own
        # micro-batch's (in this process: loader processes each keep their own).
        E = self.pairing
        step_start = start - start % E
        if (epoch, step_start) != self._step_key:
            self._step_key, self._step_samples = (epoch, step_start), {}
        mb = self._load(epoch, self.indices(epoch, start, self.batch_size))
        partners = [step_start + E - 1 - (start % E + slot) for slot in range(self.batch_size)]
        mb.epoch, mb.step, mb.first_position = epoch, start // E, start % E
        mb.partner = self._load(epoch, self.order(epoch)[partners])
        return mb

    def _load(self, epoch: int, idx: np.ndarray) -> MicroBatch:
        """Samples `idx` (of the epoch's order) as one micro-batch; a short `idx` is padded with invalid slots."""
        size, b = self.recipe.size, self.batch_size
        images = torch.empty((b, 3, size, size), dtype=torch.uint8)
        labels = torch.zeros(b, dtype=torch.long)
        valid = torch.zeros(b, dtype=torch.bool)   # padding (a ragged eval tail) stays invalid
        bad, erased = [], []
        for slot in range(b):
            if slot >= len(idx):
                images[slot].copy_(self.dummy)
                continue
            i = int(idx[slot])
            labels[slot] = self.folder.labels[i]
            img, patches, failure = self._sample(epoch, i)
            if failure is not None:
                images[slot].copy_(self.dummy)
                bad.append(failure)
                continue
            images[slot].copy_(img)
            erased.extend(dataclasses.replace(p, slot=slot) for p in patches)
            valid[slot] = True
        return MicroBatch(images, labels, valid, bad, erased)

    def _sample(self, epoch: int, i: int) -> tuple[torch.Tensor | None, list[Patch], tuple[str, str] | None]:
        """Sample `i` decoded (and augmented) for `epoch`: (pixels, erasing patches, None) or (None, [], (path,
        why)) for an unreadable file. The same whichever process or micro-batch asks."""
        if self.pairing and (epoch, i) in self._step_samples:
            return self._step_samples[(epoch, i)]
        path = self.folder.paths[i]
        self.decoded += 1
        try:
            if self.train:
                img = load_train(path, self.recipe, sample_rng(self.seed, epoch, i))
                patches = []
                if self.augment is not None:
                    img, patches = self.augment(img, 0, self.seed, epoch, i)
            else:
                img, patches = load_eval(path, self.recipe), []
            out = (img, patches, None)
        except BadImage as e:
            out = (None, [], (path, str(e)))
        if self.pairing:
            self._step_samples[(epoch, i)] = out
        return out

    def __len__(self) -> int:  # a DataLoader asks; items are addressed by key, not by this range
        return len(self.folder)


def _as_is(micro_batch: MicroBatch) -> MicroBatch:
    return micro_batch


class _Keys(torch.utils.data.Sampler):
    def __init__(self, keys):
        self.keys = keys

    def __iter__(self):
        return iter(self.keys())


def train_keys(epoch: int, cursor: int, epochs: int, steps_per_epoch: int, effective: int, batch: int,
               share: tuple[int, int] | None = None):
    """Micro-batch keys from (epoch, cursor) to the end of training, lazily. `share` = (offset, stride): a rank of a
    data-parallel group takes the micro-batches starting at offset, offset + stride, ... past each cursor."""
    offset, stride = share or (0, batch)
    def generate():
        e, c = epoch, cursor
        while e < epochs:
            for start in range(c + offset, steps_per_epoch * effective, stride):
                yield (e, start)
            e, c = e + 1, 0
    return generate


def iterate(dataset: MicroBatches, keys, num_workers: int, seed: int, spawn: bool):
    """Yield micro-batches for `keys()` in order, in this process or in `num_workers` loader processes."""
    if num_workers == 0:
        return (dataset[k] for k in keys())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=_Keys(keys), num_workers=num_workers,
        collate_fn=_as_is, pin_memory=False, prefetch_factor=2, persistent_workers=False,
        # Own generator: the loader must not draw its base seed from the global RNG (resume drift).
        generator=torch.Generator().manual_seed(seed),
        # Never fork a process that has touched CUDA/MPS.
        multiprocessing_context="spawn" if spawn else None)
    return iter(loader)


def eval_keys(n: int, batch: int, share: tuple[int, int] | None = None):
    """Micro-batch keys covering a validation folder once (the tail is padded, not dropped); with `share`, this
    rank's part of them."""
    offset, stride = share or (0, batch)
    return lambda: ((0, start) for start in range(offset, n, stride))


# An epoch's share of unreadable images is judged only once this many have been seen in it: over fewer, a few
# broken files in one place look like a failing source (and the step rule catches a vanished folder at once).
EPOCH_SHARE_MIN_IMAGES = 1000


class BadShare:
    """Counts unreadable training images per optimizer step and per epoch (in this process), and says when their
    share is too high to be a few broken files: then the data source is failing (a folder renamed away, a
    mount gone) and training would go on blanks. Checked before each micro-batch's forward pass."""

    def __init__(self, max_step_share: float, max_epoch_share: float, step_images: int,
                 epoch_min_images: int = EPOCH_SHARE_MIN_IMAGES):
        self.max_step, self.max_epoch, self.step_images = max_step_share, max_epoch_share, step_images
        self.epoch_min = epoch_min_images
        self.epoch, self.step = None, None
        self.step_bad = self.epoch_bad = self.epoch_seen = 0
        self.files: deque[tuple[str, str]] = deque(maxlen=20)   # the latest unreadable files, with reasons

    def begin_step(self, epoch: int, step: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.epoch_bad, self.epoch_seen = epoch, 0, 0
        self.step, self.step_bad = step, 0

    def count(self, images: int, bad: list[tuple[str, str]]) -> str | None:
        """Add one micro-batch; the reason to stop (what share, where), or None to go on."""
        self.step_bad += len(bad)
        self.epoch_bad += len(bad)
        self.epoch_seen += images
        self.files.extend(bad)
        # A step's share is judged against the whole step: once more than the limit is bad, the step is.
        if self.step_bad > self.max_step * self.step_images:
            return (f"{self.step_bad} of the {self.step_images} images of optimizer step {self.step + 1} could not be "
                    f"read (more than [data] max_bad_share_step = {self.max_step:g})")
        if self.epoch_seen >= self.epoch_min and self.epoch_bad > self.max_epoch * self.epoch_seen:
            return (f"{self.epoch_bad} of the {self.epoch_seen} images read so far in epoch {self.epoch + 1} could not "
                    f"be read ({self.epoch_bad / self.epoch_seen:.1%}, more than [data] max_bad_share_epoch = "
                    f"{self.max_epoch:g})")
        return None


def likely_cause(root, files) -> str:
    """Why many images could not be read, as far as the folder tells: gone, files vanished, or unreadable."""
    prefix, files = str(root) + os.sep, list(files)
    reasons = {why for _, why in files}
    named = [(path[len(prefix):] if path.startswith(prefix) else path, why) for path, why in files[-3:]]
    if len(reasons) == 1:
        shown = ", ".join(path for path, _ in named) + f" ({next(iter(reasons))})"
    else:
        shown = ", ".join(f"{path} ({why})" for path, why in named)
    if not os.path.isdir(root):
        return f"the folder {root} is gone (renamed, deleted, or the disk or mount holding it went away); e.g. {shown}"
    if reasons == {"file disappeared"}:
        return f"files vanished from {root} while training (moved or deleted); e.g. {shown}"
    return f"the files in {root} cannot be read (a failing disk or mount, permissions, or corrupt data); e.g. {shown}"


def pixel_stats(recipe, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's mean and std in uint8 pixel units, shaped (1, 3, 1, 1) to broadcast over a batch."""
    return (torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(recipe.std, device=device).view(1, 3, 1, 1) * 255)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images → float, normalised in place (no extra full-size temporaries); `mean`, `std` from pixel_stats."""
    return images.float().sub_(mean).div_(std)
