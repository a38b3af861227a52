"""ImageFolder scanning and the epoch order. No torch: the CLI validates data folders with it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import fsio
from .config import ConfigError


@dataclass(frozen=True)
class HeldOut:
    """What [data] val_split held out of a training folder (contract/split.py); part of the run's identity."""
    fraction: float
    count: int
    fingerprint: str   # of the held-out files' paths relative to the folder


@dataclass(frozen=True)
class Folder:
    """A scanned ImageFolder: sorted class names and (path, label) samples sorted by path."""
    root: Path
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    held_out: HeldOut | None = None   # the training part of a split folder: what its validation part took

    def __len__(self) -> int:
        return len(self.paths)


def class_names(root: Path) -> list[str]:
    """The class folders of an ImageFolder, sorted: its sub-folders, hidden ones left out."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan(root: Path, extensions: tuple[str, ...], what: str = "[data] train_dir",
         classes: tuple[str, ...] | None = None) -> Folder:
    """Scan an ImageFolder of two or more classes; with `classes` given (validation), a subset of them."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{what} {root} does not exist or is not a folder. Fix: point it at a folder "
                          f"with one sub-folder of images per class.")
    found = class_names(root)
    if not found:
        raise ConfigError(f"{what} {root} has no class folders. Fix: put the images in one sub-folder "
                          f"per class, e.g. {root}/cat/1.jpg and {root}/dog/2.jpg.")
    if classes is not None:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise ConfigError(f"{what} {root} has class folders the training set lacks: {unknown}. "
                              f"Fix: use the same class folder names as the training set.")
    elif len(found) < 2:   # one class trains to loss 0 and a model that always says that class
        raise ConfigError(f"{what} {root} has one class folder ({found[0]!r}); classification needs at least two. "
                          f"Fix: add a folder of images for each other class beside {root / found[0]}, or point "
                          f"{what} at the folder that holds the class folders.")
    else:
        classes = tuple(found)
    paths, labels = [], []
    # Each directory is walked once, by (device, inode): a link back up (`ln -s . cls/again`) or across to another
    # class folder adds nothing, and a loop of links cannot make the scan endless.
    seen = {fsio.file_identity(root)}   # (device, inode): follows links, so a loop is walked once
    seen.update(fsio.file_identity(root / name) for name in found)
    for name in found:
        files = _images_under(root / name, extensions, seen)
        if not files:
            raise ConfigError(f"{what}: class folder {root / name} has no images with extensions "
                              f"{' '.join(extensions)}. Fix: add images or remove the folder.")
        paths.extend(files)
        labels.extend([classes.index(name)] * len(files))
    return Folder(root, tuple(classes), tuple(paths), tuple(labels))


def _images_under(folder: Path, extensions: tuple[str, ...], seen: set[tuple[int, int]]) -> list[str]:
    """Image files under `folder` in os.walk's top-down order (names sorted), following links to directories
    not in `seen` (which grows)."""
    out, stack = [], [str(folder)]
    while stack:
        dirpath = stack.pop()
        try:
            entries = sorted(os.scandir(dirpath), key=lambda e: e.name)
        except OSError:   # unreadable or vanished: os.walk skips it too
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if _is_dir(e):
                key = fsio.file_identity(e.path)   # the directory's own identity, not the link's
                if key is not None and key not in seen:
                    seen.add(key)
                    subdirs.append(e.path)
            elif os.path.splitext(e.name)[1].lower() in extensions:
                out.append(e.path)
        stack.extend(reversed(subdirs))   # depth first, in name order, as os.walk
    return out


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()   # follows links
    except OSError:
        return False


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of an epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x0DE]).permutation(n)


def step_files(cfg, epoch: int, cursor: int) -> list[str]:
    """The image files of the optimizer step that starts at (epoch, sample cursor) of run config `cfg`."""
    from .split import training_set   # split.py builds on this module
    folder = training_set(cfg)
    order = epoch_order(cfg.run.seed, epoch, len(folder))
    return [folder.paths[int(i)] for i in order[cursor:cursor + cfg.train.effective_batch_size]]
