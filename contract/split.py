"""[data] val_split: a stratified, seed-determined share of train_dir held out as the validation set.

Which files are held out is a pure function of ([run] seed, val_split, and the paths of each class's files relative
to train_dir): every file gets the rank key sha256(seed, relative path), and each class holds out its
round(val_split x count) files (rounded half up) with the lowest keys — at least one of a class with two or more
images, never every image of a class (a class of one image keeps it for training). Hence the split is the same
on every machine, for any order the file system lists files in, and wherever train_dir is mounted; a file added
to (or removed from) a class changes no other class's split, and within its class moves at most one other file
between the two sides. Contents are not read: a held-out file is known by its path, as the data manifest knows
the training files. Standard library only (the supervisor names a step's files with it).
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Callable

from . import folders
from .config_rules import ConfigError
from .folders import Folder, HeldOut


def train_and_val(cfg, tell: Callable[[str], None] | None = None) -> tuple[Folder, Folder | None]:
    """The training and validation sets of run config `cfg`: val_dir scanned, train_dir split, or no validation."""
    train = folders.scan(cfg.data.train_dir, cfg.data.extensions)
    if cfg.data.val_dir:
        return train, folders.scan(cfg.data.val_dir, cfg.data.extensions, "[data] val_dir", train.classes)
    if not cfg.data.val_split:
        return train, None
    kept, held = hold_out(train, cfg.data.val_split, cfg.run.seed)
    if tell is not None:
        tell(f"validation set: {len(held)} of the {len(train)} images of [data] train_dir held out ([data] val_split "
             f"= {cfg.data.val_split:g}, per class, [run] seed {cfg.run.seed}); training on the other {len(kept)}")
    return kept, held


def training_set(cfg) -> Folder:
    """The images run config `cfg` trains on: train_dir without what val_split holds out."""
    train = folders.scan(cfg.data.train_dir, cfg.data.extensions)
    return hold_out(train, cfg.data.val_split, cfg.run.seed)[0] if cfg.data.val_split and not cfg.data.val_dir else train


def hold_out(folder: Folder, fraction: float, seed: int) -> tuple[Folder, Folder]:
    """(training part, held-out part) of `folder`, both in the folder's own order; the training part records
    the split (Folder.held_out) for the run's identity."""
    by_class: dict[int, list[tuple[bytes, str, int]]] = {}
    for i, path in enumerate(folder.paths):
        rel = relative(folder, path)
        by_class.setdefault(folder.labels[i], []).append((rank_key(seed, rel), rel, i))
    held: set[int] = set()
    for members in by_class.values():
        members.sort()
        held.update(i for _, _, i in members[:held_out_count(fraction, len(members))])
    if not held:
        raise ConfigError(f"[data] val_split = {fraction:g} holds out no image of {folder.root}: every class folder "
                          f"has a single image, which stays for training. Fix: add images, or give a [data] val_dir.")
    names = sorted(relative(folder, folder.paths[i]) for i in held)
    record = HeldOut(fraction, len(held), fingerprint(names))
    return _subset(folder, [i for i in range(len(folder)) if i not in held], record), _subset(folder, sorted(held))


def held_out_count(fraction: float, count: int) -> int:
    """How many of a class's `count` images are held out: round(fraction x count) half up, at least 1 of 2 or more
    when fraction > 0, and never all of them."""
    if fraction <= 0 or count < 2:
        return 0
    return min(max(math.floor(fraction * count + 0.5), 1), count - 1)


def rank_key(seed: int, rel: str) -> bytes:
    """A file's place in its class's draw: a hash of ([run] seed, its path relative to train_dir)."""
    return hashlib.sha256(f"{seed}\0{rel}".encode("utf-8", "surrogateescape")).digest()


def relative(folder: Folder, path: str) -> str:
    """`path` relative to the folder's root with '/' separators: the same name wherever the folder lies."""
    prefix = str(folder.root) + os.sep
    rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, folder.root)
    return rel.replace(os.sep, "/")


def fingerprint(names: list[str]) -> str:
    """A digest of a sorted list of relative paths."""
    return hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _subset(folder: Folder, indices: list[int], held_out: HeldOut | None = None) -> Folder:
    return Folder(folder.root, folder.classes, tuple(folder.paths[i] for i in indices),
                  tuple(folder.labels[i] for i in indices), held_out)
