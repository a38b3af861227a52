"""Micro-batches as uint8 tensors ready for in-place normalisation, in the epoch order of `folders`.

Order: epoch e visits the samples in ``permutation(seed, e)``; an optimizer step consumes
``effective_batch_size`` consecutive entries, split into micro-batches of the rung's batch size.
The resume point is a sample cursor in that order, so any rung can continue any checkpoint.
The ragged tail of an epoch (fewer than one effective batch) is skipped: every step has the same
shape and sample count on every rung (fixed shapes also keep the MPS graph cache from growing).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainctl.contract.folders import Folder, epoch_order

from .images import BadImage, Recipe, load_eval, load_train, sample_rng


@dataclass
class MicroBatch:
    """uint8 images (B, 3, H, W), labels, a validity mask and the bad files with reasons."""
    images: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    bad: list[tuple[str, str]]


class MicroBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item is one whole micro-batch, keyed by (epoch, start position).

    Keyed this way, a DataLoader's workers can load any micro-batch of any epoch without sharing
    state, and the result is the same whichever process loads it.
    """

    def __init__(self, folder: Folder, recipe: Recipe, seed: int, batch_size: int, train: bool):
        self.folder, self.recipe, self.seed = folder, recipe, seed
        self.batch_size, self.train = batch_size, train
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
        idx = self.indices(epoch, start, self.batch_size)
        size, b = self.recipe.size, self.batch_size
        images = torch.empty((b, 3, size, size), dtype=torch.uint8)
        labels = torch.zeros(b, dtype=torch.long)
        valid = torch.zeros(b, dtype=torch.bool)   # padding (a ragged eval tail) stays invalid
        bad = []
        for slot in range(b):
            if slot >= len(idx):
                images[slot].copy_(self.dummy)
                continue
            i = int(idx[slot])
            path = self.folder.paths[i]
            labels[slot] = self.folder.labels[i]
            try:
                if self.train:
                    img = load_train(path, self.recipe, sample_rng(self.seed, epoch, i))
                else:
                    img = load_eval(path, self.recipe)
            except BadImage as e:
                images[slot].copy_(self.dummy)
                bad.append((path, str(e)))
                continue
            images[slot].copy_(img)
            valid[slot] = True
        return MicroBatch(images, labels, valid, bad)

    def __len__(self) -> int:  # a DataLoader asks; items are addressed by key, not by this range
        return len(self.folder)


def _as_is(micro_batch: MicroBatch) -> MicroBatch:
    return micro_batch


class _Keys(torch.utils.data.Sampler):
    def __init__(self, keys):
        self.keys = keys

    def __iter__(self):
        return iter(self.keys())


def train_keys(epoch: int, cursor: int, epochs: int, steps_per_epoch: int, effective: int, batch: int):
    """Micro-batch keys from (epoch, cursor) to the end of training, lazily."""
    def generate():
        e, c = epoch, cursor
        while e < epochs:
            for start in range(c, steps_per_epoch * effective, batch):
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


def eval_keys(n: int, batch: int):
    """Micro-batch keys covering a validation folder once (the tail is padded, not dropped)."""
    return lambda: ((0, start) for start in range(0, n, batch))
